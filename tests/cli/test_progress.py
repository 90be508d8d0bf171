"""Plain progress lines for `qsens run` when stdout is not a terminal."""

from __future__ import annotations

from services.cli.runs import _kind_counts, progress_line
from services.common.jobs import Job, JobKind
from services.common.state import JobRecord, JobState


def _record(kind: JobKind, state: JobState, i: int, failures: int = 0) -> JobRecord:
    job = Job(kind=kind, run_id="r", params={"i": i}, name=f"{kind.value} {i}")
    return JobRecord(job=job, state=state, failures=failures)


def test_counts_and_line() -> None:
    records = [
        _record(JobKind.EXTRACT, JobState.DONE, 0),
        _record(JobKind.EXTRACT, JobState.RUNNING, 1),
        _record(JobKind.EXTRACT, JobState.RUNNING, 2, failures=1),
        _record(JobKind.STEER, JobState.PENDING, 3),
        _record(JobKind.STEER, JobState.DEAD, 4),
    ]
    counts = _kind_counts(records)
    assert counts["extract"] == {"total": 3, "done": 1, "running": 2, "dead": 0, "retried": 1}
    assert counts["steer"]["dead"] == 1 and counts["steer"]["done"] == 0
    line = progress_line(185.4, counts)
    assert line == "[  3m05s] extract 1/3 (2 running, 1 retried)  steer 0/2 (1 dead)"
