"""Plain progress lines for `qsens run` when stdout is not a terminal."""

from __future__ import annotations

from services.cli.runs import _kind_counts, progress_line
from services.common.jobs import Job, JobKind
from services.common.state import JobRecord, JobState


def _record(
    kind: JobKind, state: JobState, i: int, failures: int = 0, error: str | None = None
) -> JobRecord:
    job = Job(kind=kind, run_id="r", params={"i": i}, name=f"{kind.value} {i}")
    return JobRecord(job=job, state=state, failures=failures, error=error)


def test_counts_and_line() -> None:
    records = [
        _record(JobKind.EXTRACT, JobState.DONE, 0),
        _record(JobKind.EXTRACT, JobState.RUNNING, 1),
        _record(JobKind.EXTRACT, JobState.RUNNING, 2, failures=1),
        _record(JobKind.STEER, JobState.PENDING, 3),
        _record(JobKind.STEER, JobState.DEAD, 4),
        _record(JobKind.STEER, JobState.QUEUED, 5, error="LoaderStarting: m@gptq is waiting"),
    ]
    counts = _kind_counts(records)
    assert counts["extract"] == {
        "total": 3,
        "done": 1,
        "running": 2,
        "dead": 0,
        "retried": 1,
        "waiting": 0,
    }
    assert counts["steer"]["dead"] == 1 and counts["steer"]["done"] == 0
    assert counts["steer"]["waiting"] == 1
    line = progress_line(185.4, counts)
    assert line == (
        "[  3m05s] extract 1/3 (2 running, 1 retried)  "
        "steer 0/3 (1 waiting for their loader, 1 dead)"
    )


def test_loader_lines_of_qsens_status() -> None:
    from services.cli.runs import loader_line, loader_rows
    from services.common.loader_registry import LoaderEntry
    from services.loader.capabilities import EngineCapabilities, capabilities_to_json

    records = [
        JobRecord(
            job=Job(kind=JobKind.QUANTIZE, run_id="r", params={"model": "m", "method": "gptq"}),
            state=JobState.RUNNING,
        ),
        JobRecord(
            job=Job(kind=JobKind.STEER, run_id="r", params={"target": "m@bf16"}),
            state=JobState.PENDING,
        ),
    ]
    entry = LoaderEntry(
        variant="m@gptq",
        address="",
        instance="i",
        host="h",
        pid=1,
        announced_at=1000.0,
        state="waiting",
        since=700.0,
        detail="for checkpoint c, made by the job 'quantize m@gptq'",
    )
    other = entry.model_copy(update={"variant": "x@bf16"})  # another run's loader
    rows = loader_rows(records, [entry, other])
    assert [(r["variant"], r["state"]) for r in rows] == [("m@bf16", "none"), ("m@gptq", "waiting")]
    line = loader_line(rows[1], now=1012.0)
    assert line.split()[:2] == ["m@gptq", "waiting"]
    assert line.endswith("(5m12s) for checkpoint c, made by the job 'quantize m@gptq'")
    assert loader_line(rows[0]).endswith("no loader announced")
    # A ready loader's line names its engine (jobs are routed by its capabilities).
    caps = EngineCapabilities("vllm", False, False, True)
    ready = entry.model_copy(
        update={"state": "ready", "address": "a:1", "capabilities": capabilities_to_json(caps)}
    )
    (row,) = loader_rows(records[:1], [ready])
    assert loader_line(row).endswith("ready    at a:1 (vllm engine)")
