"""The chaos run (issue 15): the golden study on a private, supervised local stack while a worker,
a loader and NATS are killed and S3 is frozen; the stack restarts what was killed by itself.

``run(tmp, faults=True)`` starts the stack with ``localstack.up`` and the children
``qsens up --spec`` would start, submits ``tests/analyzer/golden/spec.yaml`` under the golden
run id with ``qsens run --detach``, injects ``FAULTS`` as the run's done-job count reaches theirs, waits
for the run to end, and returns what happened (``Outcome``): the analysis documents and
artefact keys (compared by the test with the golden fixture, the undisturbed run), the job
counts and the restarts. ``python -m tests.common.chaos [--no-faults]`` prints the outcome's
numbers as JSON (the reliability table of bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cli.runs import children_for_spec
from services.common import localstack
from services.common import settings as settings_mod
from tests.analyzer import golden_run as golden
from tests.loader_procs import REPO

# Job-plane timings for a run that must survive faults: a killed worker's job comes back after
# ack_wait, a missing loader is asked for again every second; five failed attempts are allowed.
PLANE = {
    "QSENS_NATS_ACK_WAIT_S": "6",
    "QSENS_NATS_RETRY_BACKOFF_S": "0.5",
    "QSENS_NATS_RETRY_BACKOFF_MAX_S": "4",
    "QSENS_NATS_UNAVAILABLE_DELAY_S": "1",
    "QSENS_NATS_FETCH_WAIT_S": "1",
    "QSENS_NATS_LOADER_TTL_S": "6",
}
# (seconds after submit, action, process, pause seconds): kills are SIGKILL, a pause is SIGSTOP
# then SIGCONT. The times fall inside the undisturbed run (about 100 s on a 2-core CPU).
# (jobs done, action, process, pause seconds): faults follow the run's progress, not the clock,
# so they land inside the run on a quiet machine (the study takes ~16 s) and a loaded one
# (~130 s) alike; the analyze job and ten others still wait after the last.
FAULTS: list[tuple[int, str, str, float]] = [
    (0, "kill", "worker-extractor", 0),
    (2, "kill", "loader-tiny@nf4", 0),
    (4, "kill", "nats", 0),
    (7, "pause", "s3", 8),
    (10, "kill", "worker-steerer", 0),
]
RUN_TIMEOUT_S = 240  # the run itself; longer counts as a hang
CLI = [sys.executable, "-m", "services.cli.main"]


@dataclass
class Outcome:
    """What a (disturbed) run did."""

    status: str = "hung"
    seconds: float = 0.0
    jobs: int = 0
    done: int = 0
    attempts: int = 0
    fired: list[str] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    last_exit: dict[str, str] = field(default_factory=dict)
    docs: dict[str, Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def numbers(self, want_keys: list[str]) -> dict[str, Any]:
        """The reliability-table row: faults, jobs, lost, duplicated, crashes, hangs, time."""
        kills = sum(1 for f in self.fired if f.startswith("kill"))
        return {
            "faults": self.fired,
            "jobs": self.jobs,
            "lost": self.jobs - self.done,
            "duplicated": len(set(self.keys) - set(want_keys)),
            "missing_keys": len(set(want_keys) - set(self.keys)),
            "redeliveries": self.attempts - self.done,  # retries, waits for a loader
            "crashes": sum(self.restarts.values()) - kills,
            "hangs": int(self.status == "hung"),
            "seconds": round(self.seconds, 1),
            "restarts": self.restarts,
        }


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ (and fresh settings) for the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    settings_mod.reset()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        settings_mod.reset()


def _current(home: Path, name: str) -> localstack.ProcessInfo:
    stack = localstack.load_stack(home)
    assert stack is not None, "stack state vanished"
    return next(p for p in stack.supervised() if p.name == name)


def _fire(home: Path, action: str, name: str, pause_s: float) -> None:
    pid = _current(home, name).pid
    if action == "kill":
        os.kill(pid, signal.SIGKILL)
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(pause_s)
    finally:
        os.kill(pid, signal.SIGCONT)


def _summary(run_id: str) -> tuple[str, int, int, int] | None:
    """(status, jobs, done, attempts) of the run, or None while NATS is unreachable."""
    from services.common.natsconn import connection
    from services.common.state import JobState, StateStore

    async def fetch() -> tuple[str, int, int, int]:
        async with connection(name="chaos") as nc:
            state = await StateStore.open(nc.jetstream())
            summary = await state.summary(run_id)
            records = await state.list_jobs(run_id)
        done = sum(1 for r in records if r.state == JobState.DONE)
        return summary.status, len(records), done, sum(r.attempts for r in records)

    try:
        return asyncio.run(fetch())
    except Exception:
        return None


def _drive(home: Path, faults: bool) -> Outcome:
    """Submit the golden study, inject the faults, wait for its end."""
    outcome = Outcome()
    submit = subprocess.run(
        [*CLI, "run", str(golden.SPEC), "--run-id", golden.RUN_ID, "--detach"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    started = time.monotonic()
    pending = list(FAULTS) if faults else []
    next_poll = started
    while time.monotonic() - started < RUN_TIMEOUT_S:
        if time.monotonic() >= next_poll:
            found = _summary(golden.RUN_ID)
            next_poll = time.monotonic() + 0.5
            if found is not None:
                outcome.status, outcome.jobs, outcome.done, outcome.attempts = found
                if outcome.status in ("succeeded", "failed", "cancelled"):
                    outcome.seconds = time.monotonic() - started
                    break
        # One fault per poll at most, so each lands on a stack that has seen the one before.
        if pending and pending[0][0] <= outcome.done:
            at, action, name, pause_s = pending.pop(0)
            _fire(home, action, name, pause_s)
            elapsed = time.monotonic() - started
            outcome.fired.append(f"{action} {name} at {at} jobs done ({elapsed:.0f}s)")
        time.sleep(0.2)
    else:
        outcome.status = "hung"
        outcome.seconds = time.monotonic() - started
    return outcome


def run(tmp: Path, *, faults: bool = True) -> Outcome:
    """The golden study on a private supervised stack under ``tmp``, with or without faults."""
    home = tmp / "stack"
    with environment({**PLANE, "QSENS_HOME": str(home)}):
        began = time.monotonic()
        stack = localstack.up(home, children=children_for_spec(golden.SPEC, home.resolve()))
        print(f"stack up in {time.monotonic() - began:.0f} s", file=sys.stderr)
        try:
            with environment(stack.full_env()):
                outcome = _drive(home.resolve(), faults)
                final = localstack.load_stack(home.resolve()) or stack
                outcome.restarts = {p.name: p.restarts for p in final.supervised() if p.restarts}
                outcome.last_exit = {p.name: p.last_exit for p in final.supervised() if p.last_exit}
                if outcome.status == "succeeded":
                    outcome.docs, outcome.keys = golden.collect()
        finally:
            localstack.down(home, timeout_s=2)  # results are in S3; no need to wait
    return outcome


def main() -> None:
    import tempfile

    faults = "--no-faults" not in sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="qsens-chaos-") as tmp:
        outcome = run(Path(tmp), faults=faults)
    _, want_keys = golden.load_fixture()
    closest: str | None = None
    diffs: int | None = None  # no documents: the run did not succeed
    if outcome.docs:
        closest, diff = golden.closest_recording(outcome.docs, intervals=True)
        for line in diff:
            print(line, file=sys.stderr)
        diffs = len(diff)
    print(
        json.dumps(
            {
                "status": outcome.status,
                "closest_recording": closest,
                "differences": diffs,
                **outcome.numbers(want_keys),
            }
        )
    )


if __name__ == "__main__":
    main()
