"""The analyze job and ``generate_report``: reruns, on-demand reports, partial and odd runs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from services.analyzer.handler import handle
from services.analyzer.loading import load_run
from services.analyzer.report_cmd import generate_report
from services.common.artefacts import analysis_key, probe_key
from services.common.dag import plan_key
from services.common.errors import InvalidArgument, NotFound
from services.common.handlers import JobContext
from services.common.jobs import Job, JobKind
from services.common.planner import build_plan
from services.common.spec import ExperimentSpec
from services.common.store import AsyncS3Store, S3Store
from tests.analyzer.planted import SPEC_DICT, probe_document, write_planted_run


def _ctx(job: Job, store: S3Store) -> JobContext:
    return JobContext(
        job=job,
        attempt=1,
        store=AsyncS3Store(store),
        log=logging.LoggerAdapter(logging.getLogger("test"), {}),
        worker_id="test",
        _msg=None,  # type: ignore[arg-type]
        _find_loader=None,  # type: ignore[arg-type]
    )


def _small_spec(**changes: Any) -> ExperimentSpec:
    data: dict[str, Any] = {
        **SPEC_DICT,
        "models": SPEC_DICT["models"][:1],
        "precisions": ["bf16", "nf4"],
        **changes,
    }
    return ExperimentSpec.model_validate(data)


def _rid() -> str:
    return "jobs-" + uuid.uuid4().hex[:10]


async def test_the_analyze_job_runs_once_and_a_rerun_returns_the_same(store: S3Store) -> None:
    run_id = _rid()
    spec = _small_spec()
    write_planted_run(store, run_id, spec_obj=spec)
    job = next(j for j in build_plan(spec, run_id).jobs if j.kind is JobKind.ANALYZE)
    first = await handle(job, _ctx(job, store))
    assert first is not None and first["already_done"] is False
    assert first["report"] == analysis_key(run_id, "report.html")
    assert first["classes"]["vector_comparison"] == {"degraded": 6}
    started = store.get_bytes(analysis_key(run_id, "started.json"))
    second = await handle(job, _ctx(job, store))
    assert second is not None and second["already_done"] is True
    assert second["report"] == first["report"] and second["inputs"] == first["inputs"]
    assert store.get_bytes(analysis_key(run_id, "started.json")) == started

    # On demand with unchanged inputs: the job's outputs, nothing new written.
    before = store.list_keys(analysis_key(run_id, "x")[: -len("x")])
    keys = await generate_report(run_id, AsyncS3Store(store))
    assert keys["report.html"] == analysis_key(run_id, "report.html")
    assert store.list_keys(analysis_key(run_id, "x")[: -len("x")]) == before

    # A result that arrives later: a fresh report folder, the job's analysis untouched.
    store.put_json(
        probe_key(run_id, "toy@nf4", "extra-probe", "result.json"),
        probe_document(run_id, "toy@nf4", "extra-probe").model_dump(mode="json"),
    )
    fresh = await generate_report(run_id, AsyncS3Store(store))
    assert fresh["folder"].startswith(analysis_key(run_id, "report-"))
    assert fresh["report.html"].startswith(fresh["folder"] + "/")
    manifest = store.get_json(fresh["manifest"])
    assert probe_key(run_id, "toy@nf4", "extra-probe", "result.json") in manifest["inputs"]
    assert store.get_bytes(analysis_key(run_id, "started.json")) == started


async def test_a_partial_run_is_analysed_and_the_report_says_what_is_missing(
    store: S3Store,
) -> None:
    run_id = _rid()
    spec = _small_spec()
    write_planted_run(store, run_id, spec_obj=spec, skip=("steer toy@nf4", "benchmark toy@nf4"))
    keys = await generate_report(run_id, AsyncS3Store(store))
    manifest = store.get_json(keys["manifest"])
    # pv and caa: own and reference vectors; arditi: both, each with add+ and ablate-.
    assert len(manifest["missing"]["steer"]) == 8
    assert len(manifest["missing"]["benchmark"]) == 1
    md = store.get_bytes(keys["report.md"]).decode()
    assert "8 expected steer result(s) are not in the bucket" in md
    assert "1 expected benchmark result(s) are not in the bucket" in md
    steering = store.get_json(keys["steering_comparison.json"])
    assert {e["target"] for e in steering["entries"]} == {"toy@bf16"}


async def test_disabled_stages_and_unknown_schemas_are_reported_not_fatal(store: S3Store) -> None:
    run_id = _rid()
    spec = _small_spec(
        steering={"enabled": False},
        logit_diff={"enabled": False},
        benchmarks=[],
    )
    write_planted_run(store, run_id, spec_obj=spec, skip=("probe toy@nf4",))
    future = probe_document(run_id, "toy@nf4", "arditi-refusal").model_dump(mode="json")
    future["schema_version"] = "qsens.probe/9"
    store.put_json(probe_key(run_id, "toy@nf4", "arditi-refusal", "result.json"), future)
    keys = await generate_report(run_id, AsyncS3Store(store))
    manifest = store.get_json(keys["manifest"])
    notes = " ".join(manifest["notes"])
    assert "Steering is disabled" in notes and "Logit difference is disabled" in notes
    assert "No capability benchmarks" in notes
    assert "schema_version 'qsens.probe/9'" in notes
    md = store.get_bytes(keys["report.md"]).decode()
    assert "Steering is disabled in the spec" in md
    assert "## Steering" in md and "_(no rows)_" in md
    assert not any(name.startswith("figures/steering-bars") for name in keys)
    probes = store.get_json(keys["probe_statistics.json"])
    assert [p["variant"] for p in probes["probes"]] == ["toy@bf16"]
    assert len(probes["safety_neuron_errors"]) == 1  # activations still compared


async def test_bad_jobs_are_invalid_arguments(store: S3Store) -> None:
    run_id = _rid()
    job = Job(kind=JobKind.ANALYZE, run_id=run_id, params={})
    with pytest.raises(InvalidArgument, match=r"params\.spec"):
        await handle(job, _ctx(job, store))
    job = Job(kind=JobKind.ANALYZE, run_id=run_id, params={"spec": {"name": "x"}})
    with pytest.raises(InvalidArgument, match=r"params\.spec"):
        await handle(job, _ctx(job, store))
    job = Job(kind=JobKind.STEER, run_id=run_id, params={})
    with pytest.raises(InvalidArgument, match="analyze jobs"):
        await handle(job, _ctx(job, store))
    with pytest.raises(NotFound, match=r"spec\.json"):
        await generate_report(run_id, AsyncS3Store(store))


async def test_the_stored_plan_decides_what_is_expected(store: S3Store) -> None:
    """load_run reads plan.json (listed among its inputs): a job the stored plan does not have
    is not expected; without a plan.json the plan is rebuilt from the spec and a note says so."""
    run_id = _rid()
    write_planted_run(store, run_id, skip=("benchmark",))
    run = await load_run(AsyncS3Store(store), run_id)
    assert plan_key(run_id) in run.inputs
    assert set(run.missing) == {"benchmark"}

    stored = store.get_json(plan_key(run_id))
    gone = {
        i
        for i, j in zip(stored["job_ids"], stored["jobs"], strict=True)
        if j["kind"] == "benchmark"
    }
    kept = [
        {**j, "deps": [d for d in j["deps"] if d not in gone]}
        for j in stored["jobs"]
        if j["kind"] != "benchmark"
    ]
    store.delete([plan_key(run_id)])
    store.put_json(plan_key(run_id), {**stored, "jobs": kept, "job_ids": []})
    assert (await load_run(AsyncS3Store(store), run_id)).missing == {}

    store.delete([plan_key(run_id)])
    rebuilt = await load_run(AsyncS3Store(store), run_id)
    assert set(rebuilt.missing) == {"benchmark"}
    assert any("no plan.json" in note for note in rebuilt.notes)
