"""The GPU-hour estimate counts the steer jobs' extra loader batches: the held-out re-score
(one per add-mode job) and the noise floor's seed replicates (one per reference job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.estimate import STEER_BATCH_SECONDS_8B, estimate_gpu_hours
from services.common.planner import build_plan
from services.common.spec import ExperimentSpec, load_spec

SEEDS = Path(__file__).resolve().parents[2] / "examples" / "seeds-matrix.yaml"


def _one_8b_at_bf16() -> ExperimentSpec:
    spec = load_spec(SEEDS)
    models = [m for m in spec.models if m.name == "llama-3.1-8b"]
    assert models[0].size_b == 8.0
    # Two precisions: the reference (noise floor) and one quantized variant.
    return spec.model_copy(update={"models": models, "precisions": spec.precisions[:2]})


def test_one_batch_per_add_job_and_one_per_noise_floor_job() -> None:
    spec = _one_8b_at_bf16()
    jobs = build_plan(spec, "run-one").jobs
    add = [j for j in jobs if j.kind.value == "steer" and j.params.get("mode") == "add"]
    floor = [j for j in add if j.params.get("noise_floor")]
    assert add and floor and len(floor) < len(add)
    assert {j.params["target"] for j in floor} == {"llama-3.1-8b@bf16"}
    est = estimate_gpu_hours(spec, jobs)
    # 8B at bf16 (factor 1) and nf4 (1.1); 64 new tokens: one measured search batch each.
    factor = {"llama-3.1-8b@bf16": 1.0, "llama-3.1-8b@nf4": 1.1}
    expected = sum(factor[j.params["target"]] for j in add) * STEER_BATCH_SECONDS_8B / 3600
    assert est.by_kind["held_out"] == pytest.approx(expected)
    assert est.by_kind["noise_floor"] == pytest.approx(len(floor) * STEER_BATCH_SECONDS_8B / 3600)


def test_no_held_out_questions_no_extra_batches() -> None:
    spec = _one_8b_at_bf16()
    full = estimate_gpu_hours(spec, build_plan(spec, "run-one").jobs)
    no_noise = spec.steering.noise.model_copy(update={"enabled": False})
    steering = spec.steering.model_copy(update={"held_out": 0, "noise": no_noise})
    none = spec.model_copy(update={"steering": steering})
    bare = estimate_gpu_hours(none, build_plan(none, "run-one").jobs)
    # The held-out re-score runs the noise floor too: without it neither batch is planned.
    assert "held_out" not in bare.by_kind and "noise_floor" not in bare.by_kind
    assert bare.by_kind["steer"] == pytest.approx(full.by_kind["steer"])
    extra = full.by_kind["held_out"] + full.by_kind["noise_floor"]
    assert full.gpu_hours - bare.gpu_hours == pytest.approx(extra)


def test_extra_batches_scale_with_new_tokens() -> None:
    spec = _one_8b_at_bf16()
    base = estimate_gpu_hours(spec, build_plan(spec, "run-one").jobs)
    steering = spec.steering.model_copy(update={"max_new_tokens": 128})
    longer = spec.model_copy(update={"steering": steering})
    est = estimate_gpu_hours(longer, build_plan(longer, "run-one").jobs)
    assert est.by_kind["held_out"] == pytest.approx(2 * base.by_kind["held_out"])
    assert est.by_kind["noise_floor"] == pytest.approx(2 * base.by_kind["noise_floor"])


def test_the_seeds_matrix_stays_within_15_gpu_hours() -> None:
    spec = load_spec(SEEDS)
    est = estimate_gpu_hours(spec, build_plan(spec, "run-seeds").jobs)
    assert est.by_kind["held_out"] > 0 and est.by_kind["noise_floor"] > 0
    assert est.gpu_hours <= 15.0, est.by_kind
