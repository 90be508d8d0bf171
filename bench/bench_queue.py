"""Job-plane overhead: per-job queue + storage cost of no-op jobs, and jobs/s per worker count.

Starts a private stack (``localstack.up``: real nats-server and SeaweedFS) in a temporary
home, then measures

* overhead: a chain of no-op jobs, each depending on the previous one, run by one worker
  process. The gap between consecutive ``finished_at`` stamps is one full cycle of the plane
  (fetch, state reads and CAS writes, handler, done, release + publish of the next job, ack)
  with no client in the loop. Measured with a handler that does nothing ("noop") and with one
  that writes one small S3 object ("noop_s3_write").
* throughput: independent no-op jobs (each writing one S3 object) drained by 1, 2 and 4
  worker processes; jobs/s from submit until the last job is done.

Prints one JSON document. Usage: ``python bench/bench_queue.py [--chain N] [--jobs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.common import localstack  # noqa: E402
from services.common import settings as settings_mod  # noqa: E402
from services.common.dag import submit_with  # noqa: E402
from services.common.jobs import Job, JobKind, RunPlan  # noqa: E402
from services.common.natsconn import connection  # noqa: E402
from services.common.queue import JobContext, JobQueue, serve_worker  # noqa: E402
from services.common.state import JobRecord, StateStore  # noqa: E402


async def noop_handler(job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Does nothing, or writes one small object when ``params['s3']`` is set."""
    if job.params.get("s3"):
        await ctx.store.put_json(ctx.key("bench", f"{job.id}.json"), {"ok": True})
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def start_workers(count: int, concurrency: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        log = open(log_dir / f"worker-{count}-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", "--concurrency", str(concurrency)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_done(state: StateStore, run_id: str, timeout_s: float) -> list[JobRecord]:
    deadline = time.monotonic() + timeout_s
    while True:
        summary = await state.summary(run_id)
        if summary.status != "running":
            if summary.status != "succeeded":
                raise RuntimeError(f"run {run_id} ended {summary.status}: {summary.counts}")
            return await state.list_jobs(run_id)
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} not done: {summary.counts}")
        await asyncio.sleep(0.1)


async def measure_chain(length: int, s3: bool) -> dict[str, float]:
    run_id = f"chain-{'s3' if s3 else 'noop'}-{uuid.uuid4().hex[:8]}"
    jobs: list[Job] = []
    for i in range(length):
        deps = [jobs[-1].id] if jobs else []
        jobs.append(Job(kind=JobKind.NOOP, run_id=run_id, params={"i": i, "s3": s3}, deps=deps))
    plan = RunPlan(run_id=run_id, spec_hash="bench-chain", jobs=jobs)
    async with connection(name="bench") as nc:
        js = nc.jetstream()
        await submit_with(plan, js=js)
        state = await StateStore.open(js)
        records = await wait_done(state, run_id, timeout_s=60 + length)
    finished = sorted(r.finished_at or 0.0 for r in records)
    gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(finished)]
    return {
        "jobs": length,
        "p50_ms": round(percentile(gaps_ms, 0.50), 2),
        "p95_ms": round(percentile(gaps_ms, 0.95), 2),
        "mean_ms": round(statistics.fmean(gaps_ms), 2),
    }


async def submit_independent(count: int) -> tuple[str, float]:
    """Submit ``count`` independent jobs (each writes one S3 object); returns run id, seconds."""
    run_id = f"tput-{uuid.uuid4().hex[:8]}"
    jobs = [
        Job(kind=JobKind.NOOP, run_id=run_id, params={"i": i, "s3": True}) for i in range(count)
    ]
    plan = RunPlan(run_id=run_id, spec_hash="bench-tput", jobs=jobs)
    async with connection(name="bench") as nc:
        started = time.perf_counter()
        await submit_with(plan, js=nc.jetstream())
        return run_id, time.perf_counter() - started


async def drain_rate(run_id: str) -> dict[str, float]:
    """Jobs/s from the first job started to the last one done."""
    async with connection(name="bench") as nc:
        records = await wait_done(await StateStore.open(nc.jetstream()), run_id, timeout_s=300)
    first = min(r.started_at or 0.0 for r in records)
    last = max(r.finished_at or 0.0 for r in records)
    return {
        "jobs": len(records),
        "seconds": round(last - first, 3),
        "jobs_per_s": round(len(records) / (last - first), 1),
    }


async def wait_for_workers(procs: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
    """Until every worker has a pull request waiting on the noop consumer."""
    deadline = time.monotonic() + 60
    async with connection(name="bench") as nc:
        queue = JobQueue(nc.jetstream())
        await queue.ensure([JobKind.NOOP])
        names = queue.names
        while True:
            info = await nc.jetstream().consumer_info(
                names.job_stream(JobKind.NOOP), names.consumer(JobKind.NOOP)
            )
            if (info.num_waiting or 0) >= len(procs):
                return
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError(f"a worker exited early; see the logs in {log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start")
            await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=200, help="jobs in each overhead chain")
    parser.add_argument("--jobs", type=int, default=400, help="jobs per throughput trial")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs in flight per worker")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to try")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker([JobKind.NOOP], noop_handler, concurrency=args.concurrency)
        return

    home = Path(tempfile.mkdtemp(prefix="qsens-bench-"))
    stack = localstack.up(home)
    try:
        os.environ.update(stack.full_env())
        os.environ["QSENS_NATS_NAMESPACE"] = "bench" + uuid.uuid4().hex[:6]
        os.environ["QSENS_LOG_LEVEL"] = "WARNING"
        settings_mod.reset()
        log_dir = home / "logs"
        result: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "servers": "nats-server 2.15.1 (JetStream, file store), SeaweedFS 4.48 S3",
            }
        }
        procs = start_workers(1, 1, log_dir)
        try:
            asyncio.run(wait_for_workers(procs, log_dir))
            result["overhead_per_job"] = {
                "noop": asyncio.run(measure_chain(args.chain, s3=False)),
                "noop_s3_write": asyncio.run(measure_chain(args.chain, s3=True)),
            }
        finally:
            stop_workers(procs)
        throughput: dict[str, Any] = {"concurrency_per_worker": args.concurrency}
        for count in (int(c) for c in args.workers.split(",")):
            # Fill the queue first, so the rate is the workers' and not the submitter's.
            run_id, submit_s = asyncio.run(submit_independent(args.jobs))
            throughput["submit_jobs_per_s"] = round(args.jobs / submit_s, 1)
            procs = start_workers(count, args.concurrency, log_dir)
            try:
                throughput[f"{count}_workers"] = asyncio.run(drain_rate(run_id))
            finally:
                stop_workers(procs)
        result["throughput"] = throughput
        print(json.dumps(result, indent=2))
    finally:
        localstack.down(home, timeout_s=3)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
