"""Scale-in without cutting a job off: a real worker process told to stop (SIGTERM, what the
kubelet sends when KEDA or an HPA removes the pod) takes no new job, finishes the one it runs,
keeps answering its liveness probe while it drains, and exits well inside the Deployments'
terminationGracePeriodSeconds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from services.common.dag import submit
from services.common.jobs import Job, JobKind, RunPlan
from services.common.localstack import free_ports
from services.common.state import JobState
from services.common.store import run_key
from tests.common.plane import open_plane
from tests.conftest import PlaneEnv
from tests.deploy.manifests import REPO, pods

# A real worker process through a whole job: out of `make test-fast`, like test_runtime.
pytestmark = pytest.mark.slow


def _livez(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


async def test_sigterm_finishes_the_running_job_and_takes_no_more(
    renders: dict[str, list[dict[str, Any]]], plane_env: PlaneEnv, run_id: str, tmp_path: Path
) -> None:
    grace = {
        p.labels["app.kubernetes.io/component"]: p.spec["terminationGracePeriodSeconds"]
        for p in pods(renders["base"])
        if p.long_running
    }
    slow = Job(kind=JobKind.NOOP, run_id=run_id, params={"parts": 4, "delay_s": 1.0}, name="slow")
    later_run = f"{run_id}-later"
    later = Job(kind=JobKind.NOOP, run_id=later_run, params={"parts": 1}, name="later")
    (port,) = free_ports(1)
    env = {**os.environ, "QSENS_METRICS_PORT": str(port), "QSENS_METRICS_HOST": "127.0.0.1"}
    code = (
        "from services.common.worker import serve_worker; "
        "serve_worker(['noop'], 'tests.common.handlers:parts', concurrency=1)"
    )
    log = tmp_path / "worker.log"
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="drain", jobs=[slow]))
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=out
            )
        try:
            part0 = run_key(run_id, "results", slow.id, "part-0.jsonl")
            deadline = time.monotonic() + 60
            while not plane.store.exists(part0):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the worker never started the job"
                await asyncio.sleep(0.05)
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # A job published now stays queued: a stopping worker takes nothing new.
            await submit(RunPlan(run_id=later_run, spec_hash="drain-later", jobs=[later]))
            # Draining, the worker is alive for its probe (a restart would cut the job off).
            assert proc.poll() is None and _livez(port) == 200
            exit_code = await asyncio.to_thread(proc.wait, 60)
            took = time.monotonic() - stopped_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert exit_code == 0, log.read_text()[-3000:]
        assert took < min(grace[c] for c in ("extractor", "steerer", "analyzer", "quantizer"))
        done = await plane.state.get_job(run_id, slow.id)
        assert done.state == JobState.DONE and done.attempts == 1, log.read_text()[-3000:]
        for i in range(4):
            (row,) = plane.store.get_jsonl(run_key(run_id, "results", slow.id, f"part-{i}.jsonl"))
            assert row["pid"] == proc.pid and row["attempt"] == 1
        waiting = await plane.state.get_job(later_run, later.id)
        assert waiting.state == JobState.QUEUED and waiting.attempts == 0
