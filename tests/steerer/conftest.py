"""Fixtures of the steerer tests: toy loaders, a judge service on NATS, and a job runner.

Loaders are real ``qsens serve loader`` processes started once per session; each test
announces them in its own namespace (the registry is just ``variant -> address``). The judge is
a real ``JudgeService`` (openai backend) on the test's namespace, talking to the rule-based
``ToyJudge`` endpoint. Jobs run through the real job plane: submitted as a run, consumed by an
in-process worker with ``services.steerer.handler.handle``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.dag import submit_with
from services.common.jobs import Job, RunPlan
from services.common.loader_registry import LoaderRegistry
from services.common.natsconn import connect
from services.common.queue import JobQueue
from services.common.settings import JudgeSettings, NatsSettings, get
from services.common.state import JobRecord, StateStore
from services.common.store import S3Store
from services.common.worker import run_worker
from services.judge.backends.base import create_backend
from services.judge.cache import KvJudgeCache
from services.judge.engine import Judge
from services.judge.service import JudgeService, judge_names
from services.steerer.handler import KINDS, handle
from tests.conftest import PlaneEnv
from tests.loader_procs import LoaderProc, start_loader
from tests.steerer.toy import ToyJudge, build_toy, toy_judge


@pytest.fixture(scope="session")
def toy_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toys")
    return {kind: build_toy(root / kind, kind) for kind in ("pv", "refusal")}  # type: ignore[arg-type]


def _loader(folder: Path, name: str, precision: str = "fp32") -> LoaderProc:
    return start_loader(
        str(folder), precision, extra_args=["--name", name], http=False, metrics=False
    )


@pytest.fixture(scope="session")
def toy_loader(toy_folders: dict[str, Path]) -> Iterator[LoaderProc]:
    """The pv toy as ``toy@fp32``."""
    proc = _loader(toy_folders["pv"], "toy")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def toyref_loader(toy_folders: dict[str, Path]) -> Iterator[LoaderProc]:
    """The refusal toy as ``toyref@fp32``."""
    proc = _loader(toy_folders["refusal"], "toyref")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def judge_endpoint() -> Iterator[ToyJudge]:
    with toy_judge() as state:
        yield state


@dataclass
class Plane:
    """The test's job plane: its S3 store, NATS connection, and helpers."""

    store: S3Store
    nc: object
    registry: LoaderRegistry
    stack: AsyncExitStack

    async def announce(self, proc: LoaderProc) -> None:
        announcement = await self.registry.announce(proc.variant, proc.address)
        self.stack.push_async_callback(announcement.stop)

    async def run(
        self, run_id: str, jobs: Sequence[Job], timeout_s: float = 120.0
    ) -> list[JobRecord]:
        """Submit ``jobs`` as a run and work them off; the final job records, in order."""
        js = self.nc.jetstream()  # type: ignore[attr-defined]
        plan = RunPlan(run_id=run_id, spec_hash="steerer-test", jobs=list(jobs))
        await submit_with(plan, js=js)
        state = await StateStore.open(js)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(KINDS, handle, stop=stop))
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                summary = await state.summary(run_id)
                if summary.status in ("succeeded", "failed"):
                    break
                if worker.done():
                    await worker
                if time.monotonic() > deadline:
                    raise AssertionError(f"run {run_id} still {summary.counts}")
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 60)
        return [await state.get_job(run_id, job.id) for job in jobs]

    async def dead_letters(self) -> list[object]:
        return list(await JobQueue(self.nc.jetstream()).dead_letters())  # type: ignore[attr-defined]


@pytest.fixture
async def plane(plane_env: PlaneEnv, judge_endpoint: ToyJudge) -> AsyncIterator[Plane]:
    """S3 + NATS of this test, with a judge service (openai backend on the toy endpoint)."""
    async with AsyncExitStack() as stack:
        nats_settings = get(NatsSettings)
        nc = await connect(nats_settings, name="steerer-test")
        stack.push_async_callback(nc.close)
        settings = JudgeSettings(
            backend="openai",
            base_url=judge_endpoint.base_url,
            model="toy-judge",
            api_key="sk-test-not-a-real-key",
            timeout_s=5.0,
            max_retries=1,
            rate_per_s=10000.0,
            burst=10000,
            batch_window_s=0.005,
        )
        names = judge_names(settings, nats_settings)
        judge_nc = await connect(nats_settings, name="steerer-test-judge")
        cache = await KvJudgeCache.open(judge_nc.jetstream(), names.cache_bucket)
        judge = Judge(create_backend(settings), cache, settings)
        service = JudgeService(
            judge_nc, judge, subject=names.subject, queue_group=names.queue_group
        )
        await service.start()

        async def stop_judge() -> None:
            await service.stop(5)
            await judge.close()
            await judge_nc.close()

        stack.push_async_callback(stop_judge)
        registry = await LoaderRegistry.open(nc.jetstream())
        yield Plane(S3Store(), nc, registry, stack)
