"""The handler registry and the worker runtime's one dispatch, against real NATS + S3.

The runtime parses a job's params by its kind's contract, skips a job whose result document
exists (one S3 read, no work) and dead-letters a malformed one naming the field; the queue,
the DAG and the runtime import one way only (queue <- dag <- worker).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

from pydantic import BaseModel

from services.common.dag import submit
from services.common.handlers import JobContext, KindHandler
from services.common.jobs import Job, JobKind, RunPlan
from services.common.loader_registry import LoaderRegistry
from services.common.state import JobState
from services.common.store import run_key
from services.common.worker import load_handler
from tests.common.handlers import behave, record_execution
from tests.common.plane import open_plane, wait_status, worker
from tests.conftest import PlaneEnv


class _Params(BaseModel):
    n: int


class _Doc(BaseModel):
    n: int
    square: int


def _key(run_id: str, params: _Params) -> str:
    return run_key(run_id, "docs", f"{params.n}.json")


async def _square(job: Job, params: _Params, ctx: JobContext) -> dict[str, Any]:
    await record_execution(job, ctx)
    doc = _Doc(n=params.n, square=params.n * params.n)
    await ctx.store.put_json(_key(job.run_id, params), doc.model_dump())
    return {"square": doc.square, "ran": True}


def _summary(doc: _Doc, key: str) -> dict[str, Any]:
    return {"square": doc.square, "stored": key}


REGISTRY = {JobKind.NOOP: KindHandler(JobKind.NOOP, _Params, _square, _Doc, _key, _summary)}


async def test_registry_parses_skips_done_results_and_names_bad_fields(
    plane_env: PlaneEnv, run_id: str
) -> None:
    fresh = Job(kind=JobKind.NOOP, run_id=run_id, params={"n": 3})
    done = Job(kind=JobKind.NOOP, run_id=run_id, params={"n": 4})
    bad = Job(kind=JobKind.NOOP, run_id=run_id, params={"n": "four"})
    async with open_plane() as plane:
        # A redelivery after a crash: the result document is there, the record is not done.
        plane.store.put_json(_key(run_id, _Params(n=4)), {"n": 4, "square": 16})
        await submit(RunPlan(run_id=run_id, spec_hash="reg", jobs=[fresh, done, bad]))
        async with worker(REGISTRY):  # type: ignore[arg-type]
            await wait_status(plane.state, run_id, ["failed"])
        assert (await plane.state.get_job(run_id, fresh.id)).result == {"square": 9, "ran": True}
        skipped = await plane.state.get_job(run_id, done.id)
        assert skipped.result == {"square": 16, "stored": _key(run_id, _Params(n=4))}
        assert plane.store.list_keys(f"runs/{run_id}/executions/{done.id}/") == []
        (letter,) = await plane.queue.dead_letters()
        assert letter.job_id == bad.id and letter.error_type == "InvalidArgument"
        assert letter.error.startswith("params.n:")
        assert plane.store.list_keys(f"runs/{run_id}/executions/{bad.id}/") == []


async def test_a_starting_loader_costs_no_attempt(plane_env: PlaneEnv, run_id: str) -> None:
    job = Job(kind=JobKind.NOOP, run_id=run_id, params={"do": "loader", "variant": "m@gptq"})
    async with open_plane() as plane:
        registry = await LoaderRegistry.open(plane.js)
        waiting = await registry.announce("m@gptq", "", state="waiting", detail="checkpoint")
        await submit(RunPlan(run_id=run_id, spec_hash="start", jobs=[job]))
        async with worker(behave):
            deadline = time.monotonic() + 20
            while (record := await plane.state.get_job(run_id, job.id)).waiting < 2:
                assert time.monotonic() < deadline, "the job was not retried"
                await asyncio.sleep(0.1)
            assert record.state == JobState.QUEUED
            assert record.unavailable == 0 and record.failures == 0
            await waiting.stop()
            ready = await registry.announce("m@gptq", "127.0.0.1:7777")
            await wait_status(plane.state, run_id, ["succeeded"])
            await ready.stop()
        assert (await plane.state.get_job(run_id, job.id)).result == {"address": "127.0.0.1:7777"}


def test_workers_load_a_registry_or_a_function_by_name() -> None:
    for path in (
        "services.steerer.handler:HANDLERS",
        "services.extractor.handler:HANDLERS",
        "services.quantizer.handler:HANDLERS",
        "tests.common.handlers:behave",
    ):
        assert callable(load_handler(path)), path


def test_the_queue_and_the_dag_do_not_import_the_worker_runtime() -> None:
    code = (
        "import sys, services.common.queue as q, services.common.dag;"
        "print(sorted(m for m in sys.modules if m in "
        "('services.common.worker', 'services.common.handlers', 'services.common.dispatch')))"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
