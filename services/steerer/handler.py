"""The steerer's job handler: ``steer``, ``logit_diff``, ``benchmark`` and ``probe`` jobs.

``qsens worker run steerer`` consumes the four queues with ``handle``. For each job it parses
the params (a malformed job is ``InvalidArgument`` and dead-lettered), returns at once when
the job's ``result.json`` already exists (a redelivery after a crash), finds the variant's
loader in the registry (``Unavailable`` when none is announced: the job is retried later) and
runs the job. Judge calls go to the judge services over NATS through one connection per
process (per event loop), opened on first use.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from nats.aio.client import Client

from services.common.artefacts import probe_key
from services.common.errors import InvalidArgument, NotFound
from services.common.jobs import Job, JobKind
from services.common.natsconn import connect
from services.common.queue import JobContext
from services.judge.client import JudgeClient
from services.loader.client import LoaderClient
from services.steerer.benchmarks import benchmark_summary, run_benchmark
from services.steerer.logit_diff import logit_diff_summary, run_logit_diff
from services.steerer.params import (
    BenchmarkParams,
    LogitDiffParams,
    ProbeParams,
    SteerParams,
    benchmark_result_key,
    logit_diff_result_key,
    parse_params,
    steer_result_key,
)
from services.steerer.probes import probe_name, probe_summary, run_probes
from services.steerer.results import BenchmarkResult, LogitDiffResult, ProbeResult, SteerResult
from services.steerer.steer import run_steer, steer_summary

__all__ = ["KINDS", "handle", "judge_client"]

#: The job kinds this handler serves.
KINDS = (JobKind.STEER, JobKind.LOGIT_DIFF, JobKind.BENCHMARK, JobKind.PROBE)

_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Client] = (
    weakref.WeakKeyDictionary()
)
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def judge_client() -> JudgeClient:
    """A judge client over this process's NATS connection (opened on first use)."""
    loop = asyncio.get_running_loop()
    lock = _locks.setdefault(loop, asyncio.Lock())
    async with lock:
        nc = _connections.get(loop)
        if nc is None or nc.is_closed:
            nc = await connect(name="qsens-steerer")
            _connections[loop] = nc
    return JudgeClient.over_nats(nc)


async def _stored(ctx: JobContext, key: str) -> Any | None:
    """The job's stored result (a redelivery of a finished job), or None: one S3 read."""
    try:
        return await ctx.store.get_json(key)
    except NotFound:
        return None


async def handle(job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Run one steerer job; returns the small summary kept in the job record."""
    run_id = job.run_id
    if job.kind is JobKind.STEER:
        steer = parse_params(SteerParams, job.params)
        key = steer_result_key(run_id, steer)
        if (done := await _stored(ctx, key)) is not None:
            return steer_summary(SteerResult.model_validate(done), key)
        address = await ctx.find_loader(steer.target)
        judge = await judge_client()
        async with LoaderClient(address, expect_variant=steer.target) as loader:
            return await run_steer(
                run_id, steer, store=ctx.store, loader=loader, judge=judge, heartbeat=ctx.heartbeat
            )
    if job.kind is JobKind.LOGIT_DIFF:
        ld = parse_params(LogitDiffParams, job.params)
        key = logit_diff_result_key(run_id, ld)
        if (done := await _stored(ctx, key)) is not None:
            return logit_diff_summary(LogitDiffResult.model_validate(done), key)
        address = await ctx.find_loader(ld.variant)
        async with LoaderClient(address, expect_variant=ld.variant) as loader:
            return await run_logit_diff(
                run_id, ld, store=ctx.store, loader=loader, heartbeat=ctx.heartbeat
            )
    if job.kind is JobKind.BENCHMARK:
        bench = parse_params(BenchmarkParams, job.params)
        key = benchmark_result_key(run_id, bench)
        if (done := await _stored(ctx, key)) is not None:
            return benchmark_summary(BenchmarkResult.model_validate(done), key)
        address = await ctx.find_loader(bench.variant)
        async with LoaderClient(address, expect_variant=bench.variant) as loader:
            return await run_benchmark(
                run_id, bench, store=ctx.store, loader=loader, heartbeat=ctx.heartbeat
            )
    if job.kind is JobKind.PROBE:
        probe = parse_params(ProbeParams, job.params)
        key = probe_key(run_id, probe.variant, probe_name(probe.probes.harmful), "result.json")
        if (done := await _stored(ctx, key)) is not None:
            return probe_summary(ProbeResult.model_validate(done), key)
        address = await ctx.find_loader(probe.variant)
        async with LoaderClient(address, expect_variant=probe.variant) as loader:
            return await run_probes(
                run_id, probe, store=ctx.store, loader=loader, heartbeat=ctx.heartbeat
            )
    raise InvalidArgument("kind", f"the steerer handles {[k.value for k in KINDS]}, not {job.kind}")
