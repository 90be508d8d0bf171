"""Taking job messages for one worker: one at a time, only into a free slot, its kinds in turn.

How a worker serving several job kinds finds its next job:

* While it has a free slot, it asks each kind's consumer in turn for one message with a
  ``no_wait`` pull request, which the server answers at once (a message, or "404 no
  messages"). The next round starts after the kind that gave the last message, so a kind with
  a long queue cannot starve the others.
* When every queue is empty it waits until a job is published on one of its kinds' subjects
  (a plain subscription to them) or ``fetch_wait_s`` has passed, whichever comes first, and
  asks again. The timed round finds redeliveries (nak delays, ack_wait expiry), which are not
  published again.
* At most one pull request is out at a time, and only while a slot is free, so the worker
  never pulls a message it cannot start. A reply that arrives after the worker stopped
  waiting for it (a slow server) stays in the kind's inbox; if no slot is free by then, it is
  kept in progress (heartbeats, so it is not redelivered elsewhere and counted as a failed
  attempt) and starts first when a slot frees.

nats-py's ``PullSubscription.fetch`` is not used: for one message it always sends a request
that lingers on the server until it expires, and such a request cannot be withdrawn. A worker
with fewer slots than kinds would then have to wait out each empty kind's long poll in turn
(the old loop: about 3 x 5 s before every job of a steerer at concurrency 1), or risk a second
message arriving for a slot it no longer has.

On stop the worker sends no more pull requests, gives back the messages it kept (nak, so
another worker takes them at once) and waits for the running jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from services.common.jobs import JobKind
from services.common.logging import get_logger
from services.common.natsconn import PlaneNames
from services.common.settings import NatsSettings

__all__ = ["Dispatcher", "Puller", "Starter"]

log = get_logger(__name__)

#: Runs one job message of a kind to its end (ack, nak, term or left for redelivery).
Starter = Callable[[JobKind, Msg], Coroutine[Any, Any, None]]

# One message if there is one, answered at once either way.
_PULL_NOW = json.dumps({"batch": 1, "no_wait": True}).encode()
# Replies that mean "nothing to deliver now".
_EMPTY = {api.StatusCode.NO_MESSAGES.value, api.StatusCode.REQUEST_TIMEOUT.value}
_FETCH_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error)
# How soon to look again when a job was announced but no queue had one to give.
_RECHECK_S = 0.1


def _status(msg: Msg) -> str | None:
    return msg.headers.get(api.Header.STATUS) if msg.headers else None


class Puller:
    """Pull requests to one kind's durable consumer, answered on an inbox of its own.

    The inbox outlives each request, so a reply that comes after ``pull`` gave up waiting is
    kept (``stray``) rather than lost until ack_wait.
    """

    def __init__(
        self, nc: Client, names: PlaneNames, kind: JobKind, on_stray: Callable[[], None]
    ) -> None:
        self.kind = kind
        self.inbox = nc.new_inbox()
        self.request_subject = (
            f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT."
            f"{names.job_stream(kind)}.{names.consumer(kind)}"
        )
        self._nc = nc
        self._on_stray = on_stray
        self._replies: asyncio.Queue[Msg] = asyncio.Queue()
        self._waiting = False
        self._sub: Subscription | None = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self.inbox, cb=self._receive)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _receive(self, msg: Msg) -> None:
        self._replies.put_nowait(msg)
        if not self._waiting and _status(msg) is None:
            self._on_stray()

    def stray(self) -> Msg | None:
        """A job message already in the inbox; replies to earlier requests are dropped."""
        while not self._replies.empty():
            msg = self._replies.get_nowait()
            if _status(msg) is None:
                return msg
        return None

    async def pull(self, timeout: float) -> Msg | None:
        """One message of this kind, or None when its queue has none to deliver now."""
        msg = self.stray()
        if msg is not None:
            return msg
        self._waiting = True
        try:
            await self._nc.publish(self.request_subject, _PULL_NOW, reply=self.inbox)
            reply = await asyncio.wait_for(self._replies.get(), timeout)
        finally:
            self._waiting = False
        status = _status(reply)
        if status is None:
            return reply
        if status in _EMPTY:
            return None
        nats.js.errors.APIError.from_msg(reply)  # raises the error the status names


class Dispatcher:
    """Pulls and starts one worker's jobs across its kinds, at most ``concurrency`` at once."""

    def __init__(
        self,
        nc: Client,
        names: PlaneNames,
        kinds: Sequence[JobKind],
        *,
        concurrency: int,
        settings: NatsSettings,
        start: Starter,
    ) -> None:
        self.nc = nc
        self.names = names
        self.concurrency = concurrency
        self.settings = settings
        self._start_job = start
        self._wake = asyncio.Event()
        self.pullers = [Puller(nc, names, kind, self._wake.set) for kind in kinds]
        self.running: set[asyncio.Task[None]] = set()
        self.held: deque[tuple[JobKind, Msg, asyncio.Task[None]]] = deque()
        self._next = 0  # index of the puller that starts the next round
        self._announced_since_round = False

    async def run(self, stop: asyncio.Event) -> None:
        """Take and start jobs until ``stop``; then wait for the started ones to finish."""
        announcements: list[Subscription] = []
        try:
            for puller in self.pullers:
                await puller.open()
                announcements.append(
                    await self.nc.subscribe(self.names.job_subject(puller.kind), cb=self._announced)
                )
            await self._loop(stop)
        finally:
            for sub in announcements:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await self._give_back_held()
            for puller in self.pullers:
                await puller.close()
            # Let running jobs finish (their heartbeats keep them ours meanwhile).
            if self.running:
                await asyncio.gather(*self.running, return_exceptions=True)

    async def _announced(self, _msg: Msg) -> None:
        self._announced_since_round = True
        self._wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        pause = min(1.0, self.settings.fetch_wait_s)
        while not stop.is_set():
            # Cleared before looking, so a publish or a finished job while we look (or while
            # we ask the server) makes the wait below return at once.
            self._wake.clear()
            self._hold_strays()
            if len(self.running) >= self.concurrency:
                await _wait_any(stop, self._wake)
                continue
            if self.held:
                kind, msg, keeper = self.held.popleft()
                keeper.cancel()
                self._start(kind, msg)
                continue
            if not self.nc.is_connected:  # reconnecting: requests would only time out
                await _wait_any(stop, timeout=pause)
                continue
            announced, self._announced_since_round = self._announced_since_round, False
            found, failed = await self._round()
            if found is not None:
                self._start(*found)
            elif failed:
                await _wait_any(stop, timeout=pause)
            else:
                # The announcement reaches us as the stream stores the job: if our request
                # overtook the store, look once more shortly instead of a whole wait later.
                idle = _RECHECK_S if announced else self.settings.fetch_wait_s
                await _wait_any(stop, self._wake, timeout=idle)

    async def _round(self) -> tuple[tuple[JobKind, Msg] | None, bool]:
        """Ask each kind once, from ``_next`` on; the first message found, and whether a
        request failed."""
        failed = False
        count = len(self.pullers)
        for step in range(count):
            index = (self._next + step) % count
            puller = self.pullers[index]
            try:
                msg = await puller.pull(timeout=self.settings.fetch_wait_s)
            except _FETCH_ERRORS as err:
                failed = True
                log.warning("fetch failed", extra={"kind": puller.kind.value, "error": repr(err)})
                continue
            if msg is not None:
                self._next = (index + 1) % count
                return (puller.kind, msg), failed
        return None, failed

    def _start(self, kind: JobKind, msg: Msg) -> None:
        task = asyncio.create_task(self._start_job(kind, msg), name=f"job-{kind.value}")
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        task.add_done_callback(lambda _t: self._wake.set())

    def _hold_strays(self) -> None:
        every = max(0.1, self.settings.ack_wait_s / 3)
        for puller in self.pullers:
            while (msg := puller.stray()) is not None:
                log.info(
                    "job message arrived late; kept in progress until a slot frees",
                    extra={"kind": puller.kind.value},
                )
                keeper = asyncio.create_task(_keep_in_progress(msg, every))
                self.held.append((puller.kind, msg, keeper))

    async def _give_back_held(self) -> None:
        self._hold_strays()
        while self.held:
            _kind, msg, keeper = self.held.popleft()
            keeper.cancel()
            with contextlib.suppress(Exception):
                await msg.nak()


async def _keep_in_progress(msg: Msg, every: float) -> None:
    """Heartbeats for a message that waits for a slot (the first one at once: it came late)."""
    while True:
        try:
            await msg.in_progress()
        except Exception as err:  # a lost heartbeat only risks a redelivery
            log.warning("heartbeat failed", extra={"error": repr(err)})
        await asyncio.sleep(every)


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Until one of ``events`` is set, or ``timeout`` seconds."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
