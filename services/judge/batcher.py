"""Micro-batching: items from many concurrent callers are grouped into batches closed by size
(``max_items``) or by a time window (``window_s`` after the batch's first item), and at most
``max_in_flight`` batches are processed at once.

A batch that raises does not fail its items' callers with the exception: each item gets
``on_error(item, exc)`` as its result, so one bad batch never loses an item.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from services.common.logging import get_logger

__all__ = ["MicroBatcher"]

log = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Groups submitted items into batches for ``process`` (one result per item, in order)."""

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R]]],
        on_error: Callable[[T, BaseException], R],
        *,
        max_items: int,
        window_s: float,
        max_in_flight: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_items < 1 or window_s < 0 or max_in_flight < 1:
            raise ValueError("max_items >= 1, window_s >= 0 and max_in_flight >= 1 required")
        self._process = process
        self._on_error = on_error
        self._on_batch = on_batch
        self.max_items = max_items
        self.window_s = window_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _ensure_runner(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` and wait for their results (in order)."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            fut: asyncio.Future[R] = loop.create_future()
            self._queue.put_nowait((item, fut))
            futures.append(fut)
        self._ensure_runner()
        return list(await asyncio.gather(*futures))

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        return (await self.submit_many([item]))[0]

    async def _collect(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        batch.append(await self._queue.get())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_items:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

    async def _run(self) -> None:
        while True:
            batch: list[tuple[T, asyncio.Future[R]]] = []
            try:
                await self._collect(batch)
                await self._slots.acquire()
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            if self._on_batch is not None:
                self._on_batch(len(items))
            results = await self._process(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"backend returned {len(results)} results for {len(items)} items"
                )
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        except Exception as exc:
            log.exception("judge micro-batch of %d items failed", len(items))
            for item, fut in batch:
                if not fut.done():
                    fut.set_result(self._on_error(item, exc))
        except asyncio.CancelledError:
            for _, fut in batch:
                if not fut.done():
                    fut.cancel()
            raise
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Finish batches in flight, cancel queued items and stop the runner."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            fut.cancel()
