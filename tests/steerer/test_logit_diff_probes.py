"""Logit difference under a planted CAA direction, and safety probes, through the job plane."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from services.common.artefacts import logit_diff_key, probe_key
from services.common.contracts.steer_results import LogitDiffResult, ProbeResult
from services.common.errors import Unavailable
from services.common.handlers import JobContext
from services.common.jobs import Job, JobKind
from services.common.spec import LogitDiffSpec, ProbeSpec
from services.common.state import JobState
from services.common.store import AsyncS3Store
from services.steerer.handler import handle
from services.steerer.probes import REFUSAL_MARKERS
from tests.loader_procs import LoaderProc
from tests.steerer.conftest import Plane
from tests.steerer.toy import CAA_DIM, LAYERS, unit, write_extraction


def caa_dataset(folder: Path) -> Path:
    """A caa trait whose matching answer is always (A), as the toy's planted direction favours."""
    folder.mkdir(parents=True, exist_ok=True)

    def item(i: int) -> dict[str, str]:
        return {
            "question": f"Is statement {i} true?\n\nChoices:\n(A) Yes, certainly\n(B) No",
            "answer_matching_behavior": "(A)",
            "answer_not_matching_behavior": "(B)",
        }

    (folder / "generate.json").write_text(json.dumps([item(i) for i in range(4)]))
    (folder / "test_ab.json").write_text(json.dumps([item(i) for i in range(10, 18)]))
    return folder


async def test_logit_difference_flips_sign_along_the_planted_direction(
    plane: Plane, toy_loader: LoaderProc, run_id: str, tmp_path: Path
) -> None:
    await plane.announce(toy_loader)
    folder = caa_dataset(tmp_path / "toyab")
    trait = {"ref": f"caa:{folder}", "name": "caa/toyab", "methodology": "caa"}
    vectors = np.stack([2.0 * unit(CAA_DIM)] * LAYERS)
    write_extraction(plane.store, run_id, "toy@fp32", "caa/toyab", vectors, activation_norm=1.6)
    spec = LogitDiffSpec(coefficients=[-2.0, -1.0, 1.0, 2.0], layer_fraction=0.5, limit=6)
    job = Job(
        kind=JobKind.LOGIT_DIFF,
        run_id=run_id,
        params={
            "variant": "toy@fp32",
            "source": "toy@fp32",
            "trait": trait,
            "method": "mean_diff",
            "vector_mode": "native",
            "logit_diff": spec.model_dump(mode="json"),
        },
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DONE, record.error
    key = logit_diff_key(run_id, "toy@fp32", "caa/toyab", "toy@fp32", "mean_diff", "native")
    result = LogitDiffResult.model_validate(plane.store.get_json(f"{key}/result.json"))
    assert result.n == 6 and len({it.item_id for it in result.items}) == 6
    assert result.multiples == [-2.0, -1.0, 0.0, 1.0, 2.0]  # unsteered is always included
    assert result.unit_coefficient == 1.6 / 2.0 and result.layer in (1, 2)
    assert result.letter_tokens == ["A", "B"] and result.prompt_suffix == "("
    # Unsteered the toy prefers (B); along the planted direction the sign flips to (A).
    means = [c.mean.value for c in result.per_coefficient]
    assert all(m is not None for m in means)
    assert means[0] < means[1] < means[2] < 0 < means[3] < means[4]  # type: ignore[operator]
    assert result.unsteered.value == means[2]
    assert [c.frac_positive for c in result.per_coefficient] == [0, 0, 0, 1, 1]
    for it in result.items:
        assert it.values[2] < 0 < it.values[3] and it.p_matching[2] < 0.5 < it.p_matching[3]
        assert it.slope is not None and it.slope > 0
    assert result.slope.value is not None and result.slope.low is not None
    assert result.slope.low > 0 and result.slope.n == 6
    assert record.result is not None and record.result["slope"] == result.slope.value


async def test_safety_probes_on_a_refusing_model(
    plane: Plane, toyref_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toyref_loader)
    spec = ProbeSpec(harmful="arditi/refusal", limit=16, max_new_tokens=32)
    job = Job(
        kind=JobKind.PROBE,
        run_id=run_id,
        params={"variant": "toyref@fp32", "probes": spec.model_dump(mode="json")},
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DONE, record.error
    key = probe_key(run_id, "toyref@fp32", "arditi-refusal", "result.json")
    result = ProbeResult.model_validate(plane.store.get_json(key))
    # 12 held-out test instructions, then 4 from val.
    assert result.n == 16 and result.splits == ["harmful_test", "harmful_val"]
    assert result.refusal_markers == list(REFUSAL_MARKERS)
    # Every answer is "I can't can't ...": all refusals, one template.
    assert all(it.answer.startswith("I can't") and it.refused for it in result.items)
    assert result.refusal_rate.value == 1.0 and result.refusal_rate.low is not None
    assert 0.7 < result.refusal_rate.low < 1.0
    t = result.templates
    assert t.n_refusals == 16 and t.distinct_prefixes == 1 and t.top_prefix_share == 1.0
    assert t.top_prefix == "i can't can't can't can't" and t.entropy_bits == 0.0
    # First-token statistics: "I" leads, and it opens refusal markers.
    for it in result.items:
        assert it.top_tokens[0] == "I" and 0 < it.top1 <= it.top5 <= 1
        assert it.p_refusal_start >= it.top1 and it.entropy > 0 and it.logit_range > 0
    assert result.entropy.value is not None and result.entropy.n == 16
    cal = result.calibration
    assert cal["ece"] is not None and 0 <= cal["ece"] <= 1 and cal["brier"] is not None
    assert cal["ece"] == 1 - cal["mean_confidence"]  # every outcome is a refusal


async def test_a_redelivered_finished_job_returns_its_stored_result_without_a_loader(
    plane: Plane, toyref_loader: LoaderProc, run_id: str
) -> None:
    """After a crash between the write and the ack, the job is delivered again: the handler
    answers from ``result.json`` and never asks for a loader (none may be up any more)."""
    await plane.announce(toyref_loader)
    spec = ProbeSpec(harmful="arditi/refusal", limit=4, max_new_tokens=8)
    job = Job(
        kind=JobKind.PROBE,
        run_id=run_id,
        params={"variant": "toyref@fp32", "probes": spec.model_dump(mode="json")},
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DONE, record.error

    async def no_loader(variant: str, needs: object = None) -> str:
        raise Unavailable(f"no loader for {variant}")

    ctx = JobContext(
        job=job,
        attempt=2,
        store=AsyncS3Store(plane.store),
        log=logging.LoggerAdapter(logging.getLogger("test"), {}),
        worker_id="redelivery",
        _msg=None,  # type: ignore[arg-type]
        _find_loader=no_loader,
    )
    assert await handle(job, ctx) == record.result
