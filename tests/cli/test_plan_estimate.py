"""`qsens plan` on the seeds' matrix: it validates offline, counts the jobs and estimates GPU-hours
from parameter counts and the stated per-job costs of services/cli/estimate.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.estimate import JOB_SECONDS_8B, estimate_gpu_hours
from services.common.planner import build_plan
from services.common.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "examples" / "seeds-matrix.yaml"
MODELS = {
    "gemma-2-2b",
    "gemma-3-4b",
    "mistral-7b",
    "qwen2.5-7b",
    "llama-3.1-8b",
    "olmo-2-7b",
    "llama-3.3-70b",
}


def test_the_seeds_matrix_is_seven_models_by_six_precisions_by_their_traits() -> None:
    spec = load_spec(SEEDS)
    assert {m.name for m in spec.models} == MODELS
    assert [p.value for p in spec.precisions] == ["bf16", "nf4", "int8", "fp4", "gptq", "awq"]
    assert (spec.steering.questions, spec.steering.held_out) == (20, 20)
    plan = build_plan(spec, "run-seeds")
    extracts = [j for j in plan.jobs if j.kind.value == "extract"]
    variants = {j.params["variant"] for j in extracts}
    assert len(variants) == 7 * 6
    traits = {j.params["trait"]["name"] for j in extracts}
    assert traits == {t.ref for t in spec.traits} and len(traits) == 6
    # Every (variant, trait) cell is extracted once (pv on quantized variants by replay).
    cells = {(j.params["variant"], j.params["trait"]["name"]) for j in extracts}
    assert len(cells) == len(extracts) == 42 * 6
    quantize = [j for j in plan.jobs if j.kind.value == "quantize"]
    assert {(j.params["model"], j.params["method"]) for j in quantize} == {
        (m, q) for m in MODELS for q in ("gptq", "awq")
    }


def test_the_estimate_scales_with_parameters_and_counts_every_gpu_job() -> None:
    spec = load_spec(SEEDS)
    plan = build_plan(spec, "run-seeds")
    est = estimate_gpu_hours(spec, plan.jobs)
    assert est.variants == 42
    assert est.gpu_hours == pytest.approx(sum(est.by_kind.values()))
    assert set(est.by_kind) == {*JOB_SECONDS_8B, "loader_start", "held_out", "noise_floor"}
    # The 70B's jobs alone cost 70.6 / 8 times an 8B's: same jobs, same precisions.
    hours = {}
    for name in ("llama-3.1-8b", "llama-3.3-70b"):
        one = spec.model_copy(update={"models": [m for m in spec.models if m.name == name]})
        hours[name] = estimate_gpu_hours(one, build_plan(one, "run-one").jobs).gpu_hours
    assert hours["llama-3.3-70b"] / hours["llama-3.1-8b"] == pytest.approx(70.6 / 8.0, rel=1e-6)
    demo = load_spec(REPO / "examples" / "demo.yaml")
    assert estimate_gpu_hours(demo, build_plan(demo, "run-demo").jobs).gpu_hours < 0.1


def test_qsens_plan_prints_the_job_count_and_the_gpu_hours(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "plan", str(SEEDS), "--local"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    spec = load_spec(SEEDS)
    plan = build_plan(spec, "run-seeds")
    match = re.search(r"(\d+) jobs, (\d+) variants; GPU-hour estimate: ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    assert int(match.group(1)) == len(plan.jobs) and int(match.group(2)) == 42
    expected = estimate_gpu_hours(spec, plan.jobs).gpu_hours
    assert float(match.group(3)) == pytest.approx(expected, abs=0.05)
    assert expected > 1.0


def test_the_estimate_follows_the_specs_workload() -> None:
    """Steering cost scales with questions x new tokens; replay extractions generate nothing."""
    spec = load_spec(SEEDS)
    full = estimate_gpu_hours(spec, build_plan(spec, "run-seeds").jobs)
    half = spec.model_copy(update={"steering": spec.steering.model_copy(update={"questions": 10})})
    halved = estimate_gpu_hours(half, build_plan(half, "run-seeds").jobs)
    assert halved.by_kind["steer"] == pytest.approx(full.by_kind["steer"] / 2)
    assert halved.by_kind["extract"] == pytest.approx(full.by_kind["extract"])
    # questions: null searches on all of a trait's steering questions: 40 in every built-in.
    no_noise = spec.steering.noise.model_copy(update={"enabled": False})
    every = spec.steering.model_copy(update={"questions": None, "held_out": 0, "noise": no_noise})
    all_questions = spec.model_copy(update={"steering": every})
    doubled = estimate_gpu_hours(all_questions, build_plan(all_questions, "run-seeds").jobs)
    assert doubled.by_kind["steer"] == pytest.approx(full.by_kind["steer"] * 2)
    off = spec.model_copy(
        update={"extraction": spec.extraction.model_copy(update={"replay": "off"})}
    )
    native = estimate_gpu_hours(off, build_plan(off, "run-seeds").jobs)
    assert native.by_kind["extract"] > full.by_kind["extract"]
