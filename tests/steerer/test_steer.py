"""Steer jobs end to end: real loaders, NATS job plane and judge service, SeaweedFS S3.

The pv toy collapses (answers ``!!!!``, coherence 10) once ``||c * v||`` passes 6; with
``||v|| = 2`` that is the coefficient ``C_STAR = 3``. Its trait score rises through ``T`` (50)
and ``U`` (80) below that, so the best coherent run lies in ``1.5 < c < 3``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from services.common.artefacts import baseline_key, steer_key
from services.common.jobs import Job, JobKind
from services.common.spec import JudgeSpec, SearchSpec, SteeringSpec
from services.common.state import JobState
from services.steerer.results import BaselineRow, SteerResult, SteerRun
from tests.loader_procs import LoaderProc
from tests.steerer.conftest import Plane
from tests.steerer.toy import COLLAPSE_X, DEAD_DIM, LAYERS, V_DIM, unit, write_extraction

VNORM = 2.0
C_STAR = COLLAPSE_X / VNORM
TRAIT = {"ref": "pv/evil", "name": "pv/evil", "methodology": "pv"}
JUDGE = JudgeSpec(backend="openai", model="toy-judge").model_dump(mode="json")


def search_spec(**fields: Any) -> SearchSpec:
    """Search settings with the start pinned at ||c0 * v|| = 0.5 * activation norm."""
    return SearchSpec(**{"init_fraction": 0.5, **fields})


def toy_vectors(dim: int = V_DIM) -> np.ndarray:
    return np.stack([VNORM * unit(dim)] * LAYERS)


def steer_job(
    run_id: str,
    *,
    target: str = "toy@fp32",
    source: str = "toy@fp32",
    search: SearchSpec,
    layers: list[int] | None = None,
    direction: str = "+",
    judge: dict[str, Any] = JUDGE,
    trait: dict[str, str] = TRAIT,
    mode: str = "add",
    questions: int = 3,
) -> Job:
    steering = SteeringSpec(
        layers=layers if layers is not None else [1, 2],
        questions=questions,
        max_new_tokens=6,
        search=search,
        bootstrap=200,
    )
    return Job(
        kind=JobKind.STEER,
        run_id=run_id,
        name=f"steer {target} with {source} {mode}{direction}",
        params={
            "target": target,
            "model": {"name": target.split("@")[0]},
            "source": source,
            "trait": trait,
            "method": "mean_diff",
            "vector_mode": "native",
            "mode": mode,
            "direction": direction,
            "steering": steering.model_dump(mode="json"),
            "judge": judge,
        },
    )


def read_result(plane: Plane, run_id: str, job: Job) -> tuple[SteerResult, list[SteerRun]]:
    p = job.params
    parts = (run_id, p["target"], p["trait"]["name"], p["source"], "mean_diff", "native")
    parts += (p["mode"], p["direction"])
    result = SteerResult.model_validate(plane.store.get_json(steer_key(*parts, "result.json")))
    runs = [
        SteerRun.model_validate(r) for r in plane.store.get_jsonl(steer_key(*parts, "runs.jsonl"))
    ]
    return result, runs


async def test_search_converges_on_the_collapse_with_equal_budgets(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    write_extraction(plane.store, run_id, "toy@fp32", "pv/evil", toy_vectors())
    search = search_spec(steps=9, fine_points=3, budget="equal")
    up = steer_job(run_id, search=search)
    away = steer_job(run_id, search=search, direction="-")
    records = await plane.run(run_id, [up, away])
    assert [r.state for r in records] == [JobState.DONE, JobState.DONE], [r.error for r in records]

    result, runs = read_result(plane, run_id, up)
    # Equal budget: every layer spent exactly steps + fine_points settings, as recorded.
    assert result.budget.mode == "equal" and result.budget.budget_per_cell == 12
    assert result.budget.runs_per_cell == {"1": 12, "2": 12}
    assert Counter(r.layer for r in runs) == {1: 12, 2: 12}
    # One loader batch and one judge batch per search step (the baseline rides in step 1).
    assert result.calls.loader_calls == 10 and result.calls.judge_calls == 10
    assert result.calls.loader_rows == 3 + 24 * 3
    assert max(r.step for r in runs) == 10
    # The search brackets the known collapse tightly at every layer.
    for layer in ("1", "2"):
        lo, hi = result.brackets[layer]
        assert lo is not None and hi is not None
        assert lo < C_STAR <= hi and hi / lo < 1.1, (layer, lo, hi)
    for r in runs:
        collapsed = r.coefficient * VNORM > COLLAPSE_X
        assert r.coherent is not collapsed, (r.coefficient, r.mean_coherence)
        assert r.mean_coherence == (10 if collapsed else r.mean_coherence)
        assert len(r.answers) == 3 and r.n == 3
    # The best coherent run is in the U band, with a bootstrap CI over questions.
    best = result.best
    assert best is not None and result.status == "ok"
    assert best.mean_trait == 80 and 1.5 < best.coefficient < C_STAR
    assert best.relative_norm == best.coefficient * VNORM / 1.6
    assert result.baseline.mean_trait == 10 and best.delta == 70
    assert best.delta_ci.low == best.delta_ci.high == 70 and best.delta_ci.n == 3
    assert set(result.best_per_layer) == {"1", "2"}
    # Judge provenance is recorded; unscorable verdicts would be counted, not zeroed.
    assert result.judge.backend == "openai" and result.judge.model == "toy-judge"
    assert result.judge.trait_rubric_hash and result.judge.coherence_rubric_hash
    assert all(r.n_unscorable_trait == 0 for r in runs)

    # The baseline was generated once and reused by the second job of the variant.
    key = baseline_key(run_id, "toy@fp32", "pv/evil", result.baseline.set_id, "answers.jsonl")
    rows = [BaselineRow.model_validate(r) for r in plane.store.get_jsonl(key)]
    assert [r.answer for r in rows] == ["abcdef"] * 3
    other, _ = read_result(plane, run_id, away)
    assert result.baseline.reused != other.baseline.reused
    assert other.baseline.key == result.baseline.key
    # Steering away (negated vector) never collapses this toy: nothing beats the baseline.
    assert other.objective == "min" and other.vector["sign"] == -1
    assert other.best is not None and other.best.delta == 0


async def test_adaptive_budget_records_unequal_runs(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    write_extraction(plane.store, run_id, "toy@fp32", "pv/evil", toy_vectors())
    job = steer_job(
        run_id, search=search_spec(steps=8, fine_points=4, budget="adaptive"), layers=[0, 3]
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DONE, record.error
    result, runs = read_result(plane, run_id, job)
    best = result.best
    assert best is not None and best.layer is not None
    fine = [r for r in runs if r.phase == "fine"]
    # The fine sweep (4 points within +-30%) went to the best layer only.
    assert len(fine) == 4 and {r.layer for r in fine} == {best.layer}
    expected = {"0": 8, "3": 8}
    expected[str(best.layer)] += 4
    assert result.budget.runs_per_cell == expected and result.budget.budget_per_cell is None
    centre = [r for r in runs if r.phase == "coarse" and r.layer == best.layer]
    assert all(0.7 * min(c.coefficient for c in centre) <= r.coefficient for r in fine)
    assert record.result is not None and record.result["runs_per_cell"] == expected


async def test_cross_precision_steering_uses_the_source_vectors(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    # The target's own extraction points along a dead dimension; the bf16 source's along v.
    write_extraction(plane.store, run_id, "toy@fp32", "pv/evil", toy_vectors(DEAD_DIM))
    write_extraction(plane.store, run_id, "toy@bf16", "pv/evil", toy_vectors(V_DIM))
    search = search_spec(steps=9, fine_points=0, budget="equal")
    cross = steer_job(run_id, source="toy@bf16", search=search, layers=[2])
    native = steer_job(run_id, search=search_spec(steps=4, fine_points=0), layers=[2])
    records = await plane.run(run_id, [cross, native])
    assert all(r.state == JobState.DONE for r in records), [r.error for r in records]

    crossed, _ = read_result(plane, run_id, cross)
    assert crossed.cross_precision and crossed.target == "toy@fp32"
    assert "/toy@bf16/extract/" in crossed.vector["summary_key"]
    assert crossed.vector["source_precision"] == "bf16"
    lo, hi = crossed.brackets["2"]
    assert lo is not None and hi is not None and lo < C_STAR <= hi
    assert crossed.best is not None and crossed.best.mean_trait == 80

    own, own_runs = read_result(plane, run_id, native)
    assert not own.cross_precision and "/toy@fp32/extract/" in own.vector["summary_key"]
    # Steering along the dead dimension changes nothing: no collapse, no trait change.
    assert all(r.coherent and r.mean_trait == 10 for r in own_runs)
    assert own.brackets["2"][1] is None


async def test_judge_backend_mismatch_fails_clearly(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    write_extraction(plane.store, run_id, "toy@fp32", "pv/evil", toy_vectors())
    job = steer_job(
        run_id,
        search=search_spec(steps=1, fine_points=0),
        layers=[1],
        judge=JudgeSpec(backend="embedding").model_dump(mode="json"),
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DEAD
    assert record.error is not None and "FailedPrecondition" in record.error
    assert "'embedding' backend" in record.error and "'openai'" in record.error


async def test_missing_extraction_is_a_clear_precondition(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    job = steer_job(run_id, search=search_spec(steps=1, fine_points=0), layers=[1])
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DEAD and record.error is not None
    assert "no extraction summary" in record.error and "toy@fp32" in record.error


async def test_directional_ablation_of_refusal(
    plane: Plane, toyref_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toyref_loader)
    trait = {"ref": "arditi/refusal", "name": "arditi/refusal", "methodology": "arditi"}
    write_extraction(plane.store, run_id, "toyref@fp32", "arditi/refusal", toy_vectors())
    job = steer_job(
        run_id,
        target="toyref@fp32",
        source="toyref@fp32",
        trait=trait,
        mode="ablate",
        direction="-",
        layers=[1, 2],
        search=search_spec(),
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DONE, record.error
    result, runs = read_result(plane, run_id, job)
    assert result.mode == "ablate" and result.questions.kind == "harmful_test"
    assert result.budget.mode == "single" and result.budget.runs_per_cell == {"all": 1}
    # One direction per candidate layer was tried on harmful_val, then one setting on test.
    assert [r.phase for r in runs] == ["select", "select", "ablate"]
    assert [r.question_set for r in runs] == ["harmful_val", "harmful_val", "harmful_test"]
    final = runs[-1]
    assert final.layers == list(range(LAYERS)) and final.coefficient == 1.0
    assert all(a.answer.startswith("Sure") for a in final.answers)
    assert result.baseline.mean_trait == 90  # "I can't can't ..." unsteered
    best = result.best
    assert best is not None and result.status == "ok"
    assert best.mean_trait == 5 and best.delta == -85
    assert best.delta_ci.high is not None and best.delta_ci.high < 0
