"""Job-plane overhead: per-job queue + storage cost of no-op jobs, and jobs/s per worker count.

Starts a private stack (``localstack.up``: real nats-server and SeaweedFS) in a temporary
home, then measures

* overhead: a chain of no-op jobs, each depending on the previous one, run by one worker
  process. The gap between consecutive ``finished_at`` stamps is one full cycle of the plane
  (fetch, state reads and CAS writes, handler, done, release + publish of the next job, ack)
  with no client in the loop. Measured with a handler that does nothing ("noop") and with one
  that writes one small S3 object ("noop_s3_write").
* throughput: independent no-op jobs (each writing one S3 object) drained by 1, 2 and 4
  worker processes; jobs/s from the first job started until the last one is done.
* kinds: one worker process at concurrency 1 (as the steerer runs) serving the steerer's four
  job kinds, on a queue with jobs of every kind ("mixed") and on one with jobs of one kind only
  ("one_busy"), next to a worker serving that one kind. A worker that waits on each empty
  kind's queue before the busy one shows here as seconds per job; each trial stops after
  ``--cap-s`` seconds and reports what was done by then.

Prints one JSON document. Usage:
``python bench/bench_queue.py [--chain N] [--jobs N] [--kinds-jobs N] [--sections a,b]``.
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
from services.common.handlers import JobContext  # noqa: E402
from services.common.jobs import Job, JobKind, RunPlan  # noqa: E402
from services.common.natsconn import connection  # noqa: E402
from services.common.settings import NatsSettings  # noqa: E402
from services.common.state import JobRecord, StateStore  # noqa: E402
from services.common.worker import serve_worker  # noqa: E402


async def noop_handler(job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Does nothing, or writes one small object when ``params['s3']`` is set."""
    if job.params.get("s3"):
        await ctx.store.put_json(ctx.key("bench", f"{job.id}.json"), {"ok": True})
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# The steerer's job kinds (``qsens worker steerer``); the busy one is the last in sorted order.
STEERER_KINDS = (JobKind.BENCHMARK, JobKind.LOGIT_DIFF, JobKind.PROBE, JobKind.STEER)


def start_workers(
    count: int,
    concurrency: int,
    log_dir: Path,
    kinds: tuple[JobKind, ...] = (JobKind.NOOP,),
) -> list[subprocess.Popen[bytes]]:
    procs = []
    served = ",".join(k.value for k in kinds)
    for i in range(count):
        log = open(log_dir / f"worker-{count}-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--concurrency",
                    str(concurrency),
                    "--served",
                    served,
                ],
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


async def submit_independent(
    count: int, kinds: tuple[JobKind, ...] = (JobKind.NOOP,)
) -> tuple[str, float]:
    """Submit ``count`` independent jobs (each writes one S3 object), spread evenly over
    ``kinds``; returns the run id and the seconds the submission took."""
    run_id = f"tput-{uuid.uuid4().hex[:8]}"
    jobs = [
        Job(kind=kinds[i % len(kinds)], run_id=run_id, params={"i": i, "s3": True})
        for i in range(count)
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


async def capped_rate(run_id: str, cap_s: float) -> dict[str, Any]:
    """Like ``drain_rate``, but stops waiting after ``cap_s`` and rates what was done by then."""
    deadline = time.monotonic() + cap_s
    async with connection(name="bench") as nc:
        state = await StateStore.open(nc.jetstream())
        while (await state.summary(run_id)).status == "running":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        records = await state.list_jobs(run_id)
    done = [r for r in records if r.finished_at]
    result: dict[str, Any] = {
        "jobs": len(records),
        "done": len(done),
        "capped": len(done) < len(records),
    }
    if done:
        finished = sorted(r.finished_at or 0.0 for r in done)
        seconds = max(finished[-1] - min(r.started_at or 0.0 for r in done), 1e-9)
        result.update(seconds=round(seconds, 3), jobs_per_s=round(len(done) / seconds, 2))
    if len(done) > 1:
        # Steady state: the first job's wait for the worker to start is left out.
        gaps = [b - a for a, b in itertools.pairwise(finished)]
        result["mean_s_between_jobs"] = round(statistics.fmean(gaps), 3)
    return result


async def wait_for_workers(procs: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
    """Until the workers have run one no-op job (so they are connected and serving)."""
    run_id = f"warm-{uuid.uuid4().hex[:8]}"
    plan = RunPlan(
        run_id=run_id, spec_hash="bench-warm", jobs=[Job(kind=JobKind.NOOP, run_id=run_id)]
    )
    deadline = time.monotonic() + 60
    async with connection(name="bench") as nc:
        js = nc.jetstream()
        await submit_with(plan, js=js)
        state = await StateStore.open(js)
        while (await state.summary(run_id)).status == "running":
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError(f"a worker exited early; see the logs in {log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start")
            await asyncio.sleep(0.05)


def measure_kinds(jobs: int, cap_s: float, log_dir: Path) -> dict[str, Any]:
    """jobs/s of one concurrency-1 worker: one kind vs the steerer's four, mixed and one busy."""
    busy = STEERER_KINDS[-1]
    trials = {
        "single_kind": ((busy,), (busy,)),
        "four_kinds_mixed": (STEERER_KINDS, STEERER_KINDS),
        "four_kinds_one_busy": (STEERER_KINDS, (busy,)),
    }
    result: dict[str, Any] = {
        "concurrency": 1,
        "served": [k.value for k in STEERER_KINDS],
        "busy_kind": busy.value,
        "cap_s": cap_s,
        "fetch_wait_s": settings_mod.get(NatsSettings).fetch_wait_s,
    }
    for name, (served, queued) in trials.items():
        run_id, _ = asyncio.run(submit_independent(jobs, queued))
        procs = start_workers(1, 1, log_dir, served)
        try:
            result[name] = asyncio.run(capped_rate(run_id, cap_s))
        finally:
            stop_workers(procs)
    return result


def measure_throughput(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """jobs/s of 1, 2, 4... no-op worker processes draining a full queue."""
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
    return throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=200, help="jobs in each overhead chain")
    parser.add_argument("--jobs", type=int, default=400, help="jobs per throughput trial")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs in flight per worker")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to try")
    parser.add_argument("--kinds-jobs", type=int, default=200, help="jobs per kinds trial")
    parser.add_argument("--cap-s", type=float, default=40.0, help="longest kinds trial (s)")
    parser.add_argument(
        "--sections", default="overhead,throughput,kinds", help="which measurements to run"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--served", default="noop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kinds = [JobKind(k) for k in args.served.split(",")]
        serve_worker(kinds, noop_handler, concurrency=args.concurrency)
        return
    sections = set(args.sections.split(","))
    unknown = sections - {"overhead", "throughput", "kinds"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}")

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
        if "overhead" in sections:
            procs = start_workers(1, 1, log_dir)
            try:
                asyncio.run(wait_for_workers(procs, log_dir))
                result["overhead_per_job"] = {
                    "noop": asyncio.run(measure_chain(args.chain, s3=False)),
                    "noop_s3_write": asyncio.run(measure_chain(args.chain, s3=True)),
                }
            finally:
                stop_workers(procs)
        if "throughput" in sections:
            result["throughput"] = measure_throughput(args, log_dir)
        if "kinds" in sections:
            result["kinds"] = measure_kinds(args.kinds_jobs, args.cap_s, log_dir)
        print(json.dumps(result, indent=2))
    finally:
        localstack.down(home, timeout_s=3)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
