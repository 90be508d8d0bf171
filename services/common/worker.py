"""The worker runtime: consume job queues, run each job once, retry or dead-letter it.

The queues themselves (streams, consumers, the DLQ) are ``services.common.queue``'s; what a
handler is, and the per-kind handler registry with its dispatch, ``services.common.handlers``.
A running job sends in-progress heartbeats every ``ack_wait_s / 3``, so only the job of a
dead worker (or of one whose event loop is blocked) is redelivered. A worker pulls one
message at a time, only into a free slot, taking its kinds in turn
(``services.common.dispatch``), so a worker that serves several kinds never waits on an empty
queue while another has work.

This module is above 500 lines because the error policy below is one state machine over
one message; splitting its transitions from its decisions would spread one table across files.

Error policy of ``run_worker``:

=====================================  =================================================
handler outcome                         what happens
=====================================  =================================================
returns                                 record done, dependents released, ack
InvalidArgument, FailedPrecondition,    dead-lettered at once (term); the worker goes on
unparseable message, unknown job
Unavailable (e.g. no loader yet)        nak with ``unavailable_delay_s``; after
                                        ``max_unavailable`` such retries, dead-lettered
LoaderStarting (its loader is announced nak with ``unavailable_delay_s``, counted as
but waiting for its checkpoint or       neither a failure nor an unavailable retry (the
loading)                                job stays queued); after ``max_waiting``, DLQ
any other exception, or the worker      nak with exponential backoff from
dies / misses heartbeats                ``retry_backoff_s``; after ``max_deliver`` failed
                                        attempts, dead-lettered with the last error
(not run) its run is cancelled          record cancelled, ack
(not run) it is done already            dependents released again, ack
=====================================  =================================================

The attempt bounds are enforced here rather than only by the server's ``max_deliver``: a
server-side limit leaves the message stranded in the work queue with nothing but an advisory,
while the worker can move it to the DLQ with its error. The consumer's ``max_deliver`` is set
above the worker's bounds as a backstop. Retry delays are per-nak delays, not the consumer's
``backoff`` list: that list also replaces ``ack_wait`` as the deadline of a job that sends
heartbeats, so a short first backoff would redeliver a healthy long job.

Before running a job the worker reads its record: a job already done is not run again, but
its dependents are released again and the message acked. That makes a crash between "results
written" and "ack" safe (see ``services.common.dag`` for the full list of crash points).
Handlers must not block the event loop (heartbeats run on it): run CPU-bound work with
``asyncio.to_thread`` and use ``ctx.store`` (async).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import settings as settings_mod
from services.common.dag import release_dependents
from services.common.dispatch import Dispatcher
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.handlers import (
    Handler,
    HandlerRegistry,
    JobContext,
    KindHandler,
    registry_handler,
)
from services.common.jobs import Job, JobKind, parse_job
from services.common.liveness import Heartbeat
from services.common.loader_registry import LoaderRegistry, LoaderStarting
from services.common.logging import configure_logging, get_logger
from services.common.metrics import start_metrics_server
from services.common.natsconn import connection
from services.common.queue import DeadLetter, JobQueue, retry_delay
from services.common.settings import CommonSettings, NatsSettings
from services.common.state import JobRecord, JobState, StateStore
from services.common.store import AsyncS3Store
from services.loader.capabilities import Needs

__all__ = ["WorkerStats", "load_handler", "run_worker", "serve_worker"]

log = get_logger(__name__)

# Results live in the KV job record; anything bigger belongs in S3.
_MAX_RESULT_BYTES = 64 * 1024
_MAX_RAW_IN_DLQ = 64 * 1024


@dataclass
class WorkerStats:
    """Outcomes counted by one ``run_worker`` call."""

    done: int = 0
    skipped: int = 0
    retried: int = 0
    dead: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _check_result(result: Any, job: Job) -> dict[str, Any] | None:
    if result is None:
        return None
    if not isinstance(result, dict):
        raise InvalidArgument("result", f"handler of {job.label} returned {type(result).__name__}")
    encoded = json.dumps(result, default=str)
    if len(encoded) > _MAX_RESULT_BYTES:
        raise InvalidArgument(
            "result", f"result summary of {job.label} is {len(encoded)} bytes; store it in S3"
        )
    parsed: dict[str, Any] = json.loads(encoded)
    return parsed


class _Worker:
    def __init__(
        self,
        *,
        nc: Client,
        queue: JobQueue,
        state: StateStore,
        store: AsyncS3Store,
        handler: Handler,
        find_loader: Callable[[str, Needs | None], Awaitable[str]],
        settings: NatsSettings,
        worker_id: str,
    ) -> None:
        self.nc = nc
        self.queue = queue
        self.state = state
        self.store = store
        self.handler = handler
        self.find_loader = find_loader
        self.settings = settings
        self.worker_id = worker_id
        self.stats = WorkerStats()

    async def serve(self, kinds: Sequence[JobKind], concurrency: int, stop: asyncio.Event) -> None:
        dispatcher = Dispatcher(
            self.nc,
            self.queue.names,
            kinds,
            concurrency=concurrency,
            settings=self.settings,
            start=self._handle,
        )
        await dispatcher.run(stop)

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, kind: JobKind, msg: Msg) -> None:
        try:
            await self._process(kind, msg)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            # Infrastructure trouble (NATS or S3 down mid-job): leave the message unacked so
            # it is redelivered after ack_wait, and keep serving.
            log.exception("job plane error", extra={"kind": kind.value, "error": repr(err)})

    async def _process(self, kind: JobKind, msg: Msg) -> None:
        meta = msg.metadata
        attempt = int(meta.num_delivered or 1)
        seq = int(meta.sequence.stream) if meta.sequence else 0
        try:
            job = parse_job(msg.data)
            if job.kind != kind:
                raise InvalidArgument(
                    "job.kind", f"{job.kind.value!r} job on the {kind.value} queue"
                )
        except InvalidArgument as err:
            await self._dead_letter(kind, msg, None, err, attempt, seq)
            return
        try:
            entry = await self.state.get_job_entry(job.run_id, job.id)
            run = await self.state.get_run(job.run_id)
        except NotFound as err:
            hint = InvalidArgument(
                "job", f"{err} (submit jobs through services.common.dag, not by hand)"
            )
            await self._dead_letter(kind, msg, job, hint, attempt, seq)
            return
        record = entry[0]
        if run.cancelled:
            await self._cancel(job)
            await msg.ack()
            self.stats.skipped += 1
            return
        if record.state == JobState.DONE:
            await self._release(record)
            await msg.ack()
            self.stats.skipped += 1
            return
        if record.state in (JobState.DEAD, JobState.CANCELLED):
            await msg.ack()
            self.stats.skipped += 1
            return
        if _carried_by_other(record, seq):
            await self._drop_duplicate(msg, job)
            return
        if record.state == JobState.PENDING:
            # Published by hand before its deps finished; release will publish it again.
            await self._retry_later(
                kind, msg, job, record, attempt, seq, Unavailable(f"deps of {job.label} not done")
            )
            return
        # Earlier deliveries of this message that did not end in "loader unavailable" or
        # "loader starting" either raised or died with their worker: both count against
        # max_deliver.
        prior_failures = max(0, attempt - 1 - record.unavailable - record.waiting)
        if prior_failures >= self.settings.max_deliver:
            reason = record.error or "worker died or missed its heartbeats"
            await self._dead_letter(
                kind,
                msg,
                job,
                RuntimeError(f"gave up after {prior_failures} attempts: {reason}"),
                attempt - 1,
                seq,
            )
            return
        running = await self._mark_running(job, attempt, prior_failures, seq, entry)
        record = running[0]
        if record.state == JobState.DONE:
            # A concurrent duplicate finished while we were reading.
            await self._release(record)
            await msg.ack()
            self.stats.skipped += 1
            return
        if record.msg_seq != seq:
            await self._drop_duplicate(msg, job)
            return
        await self._run(kind, msg, job, running, attempt, prior_failures, seq)

    async def _run(
        self,
        kind: JobKind,
        msg: Msg,
        job: Job,
        running: tuple[JobRecord, int],
        attempt: int,
        prior_failures: int,
        seq: int,
    ) -> None:
        record = running[0]
        cfg = self.settings
        adapter = logging.LoggerAdapter(
            get_logger(f"qsens.job.{kind.value}"),
            {"job_id": job.id, "run_id": job.run_id, "kind": kind.value, "attempt": attempt},
        )
        ctx = JobContext(
            job=job,
            attempt=attempt,
            store=self.store,
            log=adapter,
            worker_id=self.worker_id,
            _msg=msg,
            _find_loader=self.find_loader,
        )
        heartbeat = asyncio.create_task(self._heartbeat(msg, max(0.1, cfg.ack_wait_s / 3)))
        started = time.monotonic()
        failure: Exception | None = None
        result: dict[str, Any] | None = None
        try:
            result = _check_result(await self.handler(job, ctx), job)
        except Exception as err:
            failure = err
        finally:
            heartbeat.cancel()
        if failure is None:
            done = await self._mark_done(job, result, running)
            await self._release(done)
            await msg.ack()
            self.stats.done += 1
            self.stats.by_kind[kind.value] = self.stats.by_kind.get(kind.value, 0) + 1
            adapter.info("job done", extra={"seconds": round(time.monotonic() - started, 3)})
        elif isinstance(failure, InvalidArgument | FailedPrecondition):
            await self._dead_letter(kind, msg, job, failure, attempt, seq)
        elif isinstance(failure, Unavailable):  # LoaderStarting included
            await self._retry_later(kind, msg, job, record, attempt, seq, failure)
        else:
            failures = prior_failures + 1
            if failures >= cfg.max_deliver:
                await self._dead_letter(kind, msg, job, failure, attempt, seq)
                return
            await self._mark_failed(job, failure)
            delay = retry_delay(failures, cfg)
            await msg.nak(delay=delay)
            self.stats.retried += 1
            adapter.warning(
                "job failed; retrying", extra={"error": _error_text(failure), "delay_s": delay}
            )

    async def _retry_later(
        self,
        kind: JobKind,
        msg: Msg,
        job: Job,
        record: JobRecord,
        attempt: int,
        seq: int,
        failure: Unavailable,
    ) -> None:
        """Nak ``job`` for ``unavailable_delay_s``: a dependency is down (bounded by
        ``max_unavailable``) or its loader is starting (``max_waiting``; no attempt is spent:
        it is waiting for its checkpoint, or loading)."""
        starting = isinstance(failure, LoaderStarting)
        cfg = self.settings
        used, limit = (
            (record.waiting, cfg.max_waiting)
            if starting
            else (record.unavailable, cfg.max_unavailable)
        )
        if used + 1 > limit:
            await self._dead_letter(kind, msg, job, failure, attempt, seq)
            return
        text = _error_text(failure)

        def change(r: JobRecord) -> JobRecord | None:
            if r.state in (JobState.DONE, JobState.DEAD):
                return None
            # A pending job stays pending: only release may move it on.
            if r.state == JobState.PENDING:
                state = JobState.PENDING
            else:
                state = JobState.QUEUED if starting else JobState.FAILED
            if starting:
                return r.evolve(state=state, waiting=r.waiting + 1, error=text)
            return r.evolve(state=state, unavailable=r.unavailable + 1, error=text)

        await self.state.mutate_job(job.run_id, job.id, change)
        await msg.nak(delay=cfg.unavailable_delay_s)
        self.stats.retried += 1
        log.info(
            "loader starting; retrying later without counting an attempt"
            if starting
            else "dependency unavailable; retrying later",
            extra={"job_id": job.id, "kind": kind.value, "error": str(failure)},
        )

    async def _drop_duplicate(self, msg: Msg, job: Job) -> None:
        # Another, still unacked message carries this job (a publish outside the duplicate
        # window): that one finishes it, this one is dropped.
        await msg.ack()
        self.stats.skipped += 1
        log.info("duplicate job message dropped", extra={"job_id": job.id})

    async def _heartbeat(self, msg: Msg, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await msg.in_progress()
            except Exception as err:  # a lost heartbeat only risks a redelivery
                log.warning("heartbeat failed", extra={"error": repr(err)})

    # -- state transitions ----------------------------------------------------------------

    async def _mark_running(
        self, job: Job, attempt: int, failures: int, seq: int, known: tuple[JobRecord, int]
    ) -> tuple[JobRecord, int]:
        now = time.time()

        def change(r: JobRecord) -> JobRecord | None:
            if r.state == JobState.DONE or _carried_by_other(r, seq):
                return None
            return r.evolve(
                state=JobState.RUNNING,
                attempts=attempt,
                failures=failures,
                worker=self.worker_id,
                started_at=now,
                msg_seq=seq,
            )

        return await self.state.mutate_job_entry(job.run_id, job.id, change, known=known)

    async def _mark_failed(self, job: Job, err: BaseException) -> None:
        text = _error_text(err)

        def change(r: JobRecord) -> JobRecord | None:
            if r.state in (JobState.DONE, JobState.DEAD):
                return None
            # A pending job stays pending: only release may move it on.
            state = JobState.PENDING if r.state == JobState.PENDING else JobState.FAILED
            return r.evolve(state=state, failures=r.failures + 1, error=text)

        await self.state.mutate_job(job.run_id, job.id, change)

    async def _mark_done(
        self, job: Job, result: dict[str, Any] | None, known: tuple[JobRecord, int]
    ) -> JobRecord:
        now = time.time()

        def change(r: JobRecord) -> JobRecord | None:
            if r.state == JobState.DONE:
                return None
            return r.evolve(state=JobState.DONE, result=result, error=None, finished_at=now)

        return await self.state.mutate_job(job.run_id, job.id, change, known=known)

    async def _cancel(self, job: Job) -> None:
        def change(r: JobRecord) -> JobRecord | None:
            if r.state in (JobState.DONE, JobState.DEAD, JobState.CANCELLED):
                return None
            return r.evolve(state=JobState.CANCELLED, finished_at=time.time())

        with contextlib.suppress(NotFound):
            await self.state.mutate_job(job.run_id, job.id, change)

    async def _release(self, record: JobRecord) -> None:
        await release_dependents(record, state=self.state, queue=self.queue)

    async def _dead_letter(
        self,
        kind: JobKind,
        msg: Msg,
        job: Job | None,
        err: BaseException,
        attempts: int,
        seq: int,
    ) -> None:
        raw = None
        if job is None:
            raw = msg.data[:_MAX_RAW_IN_DLQ].decode("utf-8", errors="replace")
        letter = DeadLetter(
            kind=kind.value,
            job=job.to_wire() if job else None,
            raw=raw,
            job_id=job.id if job else None,
            run_id=job.run_id if job else None,
            error_type=type(err).__name__,
            error=str(err),
            attempts=attempts,
            worker=self.worker_id,
            stream_seq=seq,
        )
        # DLQ first, then the record, then term: a crash in between redelivers the message
        # and the dead letter is stored again under the same message id (deduplicated).
        await self.queue.dead_letter(letter)
        if job is not None:
            text = _error_text(err)

            def change(r: JobRecord) -> JobRecord | None:
                if r.state == JobState.DONE:
                    return None
                return r.evolve(
                    state=JobState.DEAD, error=text, finished_at=time.time(), attempts=attempts
                )

            with contextlib.suppress(NotFound):
                await self.state.mutate_job(job.run_id, job.id, change)
        await msg.term()
        self.stats.dead += 1
        log.error(
            "job dead-lettered",
            extra={
                "kind": kind.value,
                "job_id": letter.job_id,
                "run_id": letter.run_id,
                "error": f"{letter.error_type}: {letter.error}",
                "attempts": attempts,
            },
        )


def _carried_by_other(record: JobRecord, seq: int) -> bool:
    """Whether a different, still unacked message is running or retrying this job."""
    return record.msg_seq not in (None, seq) and record.state in (
        JobState.RUNNING,
        JobState.FAILED,
    )


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_worker(
    kinds: Iterable[JobKind | str],
    handler: Handler | HandlerRegistry,
    *,
    concurrency: int = 1,
    stop: asyncio.Event,
    settings: NatsSettings | None = None,
    store: AsyncS3Store | None = None,
    worker_id: str | None = None,
) -> WorkerStats:
    """Consume ``kinds`` with ``handler`` (at most ``concurrency`` jobs at once) until ``stop``.

    Returns what it did. On stop it fetches nothing more and waits for running jobs.
    """
    kind_list = sorted({JobKind(k) for k in kinds})
    if not kind_list:
        raise InvalidArgument("kinds", "a worker needs at least one job kind")
    if concurrency < 1:
        raise InvalidArgument("concurrency", f"must be >= 1, got {concurrency}")
    cfg = settings or settings_mod.get(NatsSettings)
    wid = worker_id or _default_worker_id()
    async_store = store or AsyncS3Store()
    await async_store.ensure_bucket()
    async with connection(cfg, name=f"qsens-worker-{wid}") as nc:
        js = nc.jetstream()
        queue = JobQueue(js, cfg)
        await queue.ensure(kind_list)
        state = await StateStore.open(js, cfg)
        registry = await LoaderRegistry.open(js, cfg)
        worker = _Worker(
            nc=nc,
            queue=queue,
            state=state,
            store=async_store,
            handler=_as_handler(handler),
            find_loader=registry.find,
            settings=cfg,
            worker_id=wid,
        )
        log.info(
            "worker serving",
            extra={
                "kinds": [k.value for k in kind_list],
                "worker": wid,
                "concurrency": concurrency,
            },
        )
        await worker.serve(kind_list, concurrency, stop)
        return worker.stats


def _as_handler(handler: Handler | HandlerRegistry) -> Handler:
    if isinstance(handler, Mapping):
        return registry_handler(handler)
    return handler


def load_handler(path: str) -> Handler:
    """Import ``"module:name"``: a handler function, or a handler registry (``{kind:
    KindHandler}``) served through ``dispatch``; InvalidArgument when it does not resolve."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument("handler", f"expected 'module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InvalidArgument("handler", f"cannot import {module_name!r}: {err}") from None
    handler = getattr(module, attr, None)
    if isinstance(handler, Mapping) and all(isinstance(v, KindHandler) for v in handler.values()):
        return registry_handler(handler)
    if not callable(handler):
        raise InvalidArgument("handler", f"{module_name} has no handler or registry {attr!r}")
    return handler  # type: ignore[no-any-return]


def serve_worker(
    kinds: Iterable[JobKind | str],
    handler: Handler | HandlerRegistry | str,
    *,
    concurrency: int = 1,
) -> WorkerStats:
    """Run a worker process until SIGTERM/SIGINT (logging set up from CommonSettings)."""
    common = settings_mod.get(CommonSettings)
    configure_logging("worker", common.log_level, common.log_format)
    resolved = load_handler(handler) if isinstance(handler, str) else handler
    # /livez on the metrics port: stale when the event loop that runs the consumer is stuck.
    heartbeat = Heartbeat()
    if common.metrics_port:
        bound = start_metrics_server(
            common.metrics_port, common.metrics_host, checks={"/livez": heartbeat.check}
        )
        log.info("worker metrics on %s:%d", common.metrics_host, bound)

    async def main() -> WorkerStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        beating = asyncio.create_task(heartbeat.run())
        try:
            return await run_worker(kinds, resolved, concurrency=concurrency, stop=stop)
        finally:
            beating.cancel()

    return asyncio.run(main())
