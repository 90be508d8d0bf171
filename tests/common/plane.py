"""Helpers for job-plane tests: open the plane, run in-process workers, wait for runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext

from services.common.handlers import Handler
from services.common.jobs import JobKind
from services.common.natsconn import connection
from services.common.queue import JobQueue
from services.common.state import RunSummary, StateStore
from services.common.store import S3Store
from services.common.worker import WorkerStats, run_worker


@dataclass
class Plane:
    nc: Client
    js: JetStreamContext
    queue: JobQueue
    state: StateStore
    store: S3Store


@asynccontextmanager
async def open_plane() -> AsyncIterator[Plane]:
    """A connection with the queue (all streams ensured), state and store of the test's env."""
    async with connection(name="test") as nc:
        js = nc.jetstream()
        queue = JobQueue(js)
        await queue.ensure()
        state = await StateStore.open(js)
        yield Plane(nc, js, queue, state, S3Store())


@asynccontextmanager
async def worker(
    handler: Handler, kinds: Iterable[JobKind] = (JobKind.NOOP,), concurrency: int = 1
) -> AsyncIterator[asyncio.Task[WorkerStats]]:
    """An in-process worker for the duration of the block (stopped and awaited after)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(kinds, handler, concurrency=concurrency, stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def wait_status(
    state: StateStore, run_id: str, statuses: Iterable[str], timeout_s: float = 20.0
) -> RunSummary:
    """Poll the run's summary until its status is one of ``statuses``."""
    wanted = set(statuses)
    deadline = time.monotonic() + timeout_s
    summary = await state.summary(run_id)
    while summary.status not in wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {summary.status}: {summary.counts}")
        await asyncio.sleep(0.1)
        summary = await state.summary(run_id)
    return summary
