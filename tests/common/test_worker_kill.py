"""SIGKILL a real worker process mid-job: the job is redelivered, the run completes once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.common.dag import submit
from services.common.jobs import Job, JobKind, RunPlan
from services.common.state import JobState
from services.common.store import run_key
from tests.common.plane import open_plane, wait_status
from tests.conftest import PlaneEnv

REPO = Path(__file__).resolve().parents[2]


def start_worker(log_path: Path) -> subprocess.Popen[bytes]:
    code = (
        "from services.common.worker import serve_worker; "
        "serve_worker(['noop'], 'tests.common.handlers:parts', concurrency=1)"
    )
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )


async def test_sigkill_mid_job_redelivers_and_completes_with_one_set_of_results(
    plane_env: PlaneEnv, run_id: str, tmp_path: Path
) -> None:
    slow = Job(kind=JobKind.NOOP, run_id=run_id, params={"parts": 3, "delay_s": 0.8}, name="slow")
    fast = Job(kind=JobKind.NOOP, run_id=run_id, params={"parts": 1}, name="fast")
    join = Job(
        kind=JobKind.NOOP, run_id=run_id, params={"parts": 1}, deps=[slow.id, fast.id], name="join"
    )
    plan = RunPlan(run_id=run_id, spec_hash="kill", jobs=[slow, fast, join])
    log_path = tmp_path / "workers.log"
    async with open_plane() as plane:
        store = plane.store
        await submit(plan)
        first = start_worker(log_path)
        second = None
        try:
            # The first worker takes `slow` (published first, concurrency 1); kill it once
            # the first part is stored, i.e. mid-job with results half written.
            deadline = time.monotonic() + 30
            part0 = run_key(run_id, "results", slow.id, "part-0.jsonl")
            while not store.exists(part0):
                assert first.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the first worker never started the job"
                await asyncio.sleep(0.05)
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            running = await plane.state.get_job(run_id, slow.id)
            assert running.state == JobState.RUNNING and running.attempts == 1
            second = start_worker(log_path)
            summary = await wait_status(plane.state, run_id, ["succeeded", "failed"], 40)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=15)
        assert summary.status == "succeeded", log_path.read_text()

        # KV: each job done; the killed one took two deliveries, the others one.
        records = {r.job.id: r for r in await plane.state.list_jobs(run_id)}
        assert {r.state for r in records.values()} == {JobState.DONE}
        assert records[slow.id].attempts == 2
        assert records[fast.id].attempts == 1
        assert records[join.id].attempts == 1
        assert records[join.id].released_by in {slow.id, fast.id}

        # S3: exactly one set of results; part 0 is still the killed attempt's (write-once).
        results = store.list_keys(f"runs/{run_id}/results/")
        assert results == sorted(
            [run_key(run_id, "results", slow.id, f"part-{i}.jsonl") for i in range(3)]
            + [run_key(run_id, "results", fast.id, "part-0.jsonl")]
            + [run_key(run_id, "results", join.id, "part-0.jsonl")]
        )
        (row,) = store.get_jsonl(part0)
        assert row["attempt"] == 1 and row["pid"] == first.pid
        later = json.loads(store.get_bytes(run_key(run_id, "results", slow.id, "part-2.jsonl")))
        assert later["attempt"] == 2 and later["pid"] == second.pid

        # Executions: the killed job ran twice, everything else once (the join never twice).
        def runs_of(job: Job) -> int:
            return len(store.list_keys(f"runs/{run_id}/executions/{job.id}/"))

        assert (runs_of(slow), runs_of(fast), runs_of(join)) == (2, 1, 1)
        assert await plane.queue.depth(JobKind.NOOP) == 0
        assert await plane.queue.dead_letters() == []
