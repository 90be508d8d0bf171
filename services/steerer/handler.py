"""The steerer's job handler: ``steer``, ``logit_diff``, ``benchmark`` and ``probe`` jobs.

``qsens worker run steerer`` consumes the four queues through ``HANDLERS``: the worker
runtime parses each job's params (a malformed job is ``InvalidArgument`` and dead-lettered)
and returns at once when the job's ``result.json`` already exists (a redelivery after a
crash); the handler finds the variant's loader in the registry, among those whose engine computes
what the job needs (``services.common.loader_registry``: retried while one may come, failed at
once where a local stack's supervisor runs none), and runs the job. Judge calls go to the judge
services over NATS through one connection per process (per event loop), opened on first use.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from nats.aio.client import Client

from services.common.artefacts import probe_key
from services.common.contracts.steer import (
    BenchmarkParams,
    LogitDiffParams,
    ProbeParams,
    SteerParams,
    benchmark_result_key,
    logit_diff_result_key,
    steer_result_key,
)
from services.common.contracts.steer_results import (
    BenchmarkResult,
    LogitDiffResult,
    ProbeResult,
    SteerResult,
)
from services.common.handlers import JobContext, KindHandler, registry_handler
from services.common.jobs import Job, JobKind
from services.common.natsconn import connect
from services.judge.client import JudgeClient
from services.loader.client import LoaderClient
from services.steerer import benchmarks, logit_diff, probes
from services.steerer.benchmarks import benchmark_summary, run_benchmark
from services.steerer.logit_diff import logit_diff_summary, run_logit_diff
from services.steerer.probes import probe_name, probe_summary, run_probes
from services.steerer.steer import run_steer, steer_needs, steer_summary

__all__ = ["HANDLERS", "KINDS", "handle", "judge_client", "probe_result_key"]

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


def probe_result_key(run_id: str, params: ProbeParams) -> str:
    """Where a probe job's ``result.json`` goes."""
    return probe_key(run_id, params.variant, probe_name(params.probes.harmful), "result.json")


async def _steer(job: Job, steer: SteerParams, ctx: JobContext) -> dict[str, Any]:
    address = await ctx.find_loader(steer.target, steer_needs(steer))
    judge = await judge_client()
    async with LoaderClient(address, expect_variant=steer.target) as loader:
        return await run_steer(
            job.run_id, steer, store=ctx.store, loader=loader, judge=judge, heartbeat=ctx.heartbeat
        )


async def _logit_diff(job: Job, ld: LogitDiffParams, ctx: JobContext) -> dict[str, Any]:
    address = await ctx.find_loader(ld.variant, logit_diff.NEEDS)
    async with LoaderClient(address, expect_variant=ld.variant) as loader:
        return await run_logit_diff(
            job.run_id, ld, store=ctx.store, loader=loader, heartbeat=ctx.heartbeat
        )


async def _benchmark(job: Job, bench: BenchmarkParams, ctx: JobContext) -> dict[str, Any]:
    address = await ctx.find_loader(bench.variant, benchmarks.NEEDS)
    async with LoaderClient(address, expect_variant=bench.variant) as loader:
        return await run_benchmark(
            job.run_id, bench, store=ctx.store, loader=loader, heartbeat=ctx.heartbeat
        )


async def _probe(job: Job, probe: ProbeParams, ctx: JobContext) -> dict[str, Any]:
    address = await ctx.find_loader(probe.variant, probes.NEEDS)
    async with LoaderClient(address, expect_variant=probe.variant) as loader:
        return await run_probes(
            job.run_id, probe, store=ctx.store, loader=loader, heartbeat=ctx.heartbeat
        )


#: The steerer's kinds: params contract, result document and where it lives, and the work.
HANDLERS: dict[JobKind, KindHandler[Any, Any]] = {
    JobKind.STEER: KindHandler(
        JobKind.STEER, SteerParams, _steer, SteerResult, steer_result_key, steer_summary
    ),
    JobKind.LOGIT_DIFF: KindHandler(
        JobKind.LOGIT_DIFF,
        LogitDiffParams,
        _logit_diff,
        LogitDiffResult,
        logit_diff_result_key,
        logit_diff_summary,
    ),
    JobKind.BENCHMARK: KindHandler(
        JobKind.BENCHMARK,
        BenchmarkParams,
        _benchmark,
        BenchmarkResult,
        benchmark_result_key,
        benchmark_summary,
    ),
    JobKind.PROBE: KindHandler(
        JobKind.PROBE, ProbeParams, _probe, ProbeResult, probe_result_key, probe_summary
    ),
}

#: The job kinds this handler serves.
KINDS = tuple(HANDLERS)

handle = registry_handler(HANDLERS)
"""Run one steerer job (``dispatch`` over ``HANDLERS``); returns the job-record summary."""
