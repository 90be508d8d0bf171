"""The judge as a NATS service: a queue-group subscriber on ``qsens.judge.score``.

Each request is a JSON ``JudgeRequest`` (the client chunks big batches so every request and
reply fits the server's max payload); the reply is a ``JudgeReply`` with one result per item,
in order, or a request-level error (``invalid_argument``, ``too_large`` when the reply would
not fit so the client splits the chunk, ``internal``). Requests are handled concurrently and
identical items across concurrent requests go upstream once. Any number of services may join
the queue group; SIGTERM stops taking requests and finishes those in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.common.localstack import write_ready_file
from services.common.logging import get_logger
from services.common.metrics import start_metrics_server
from services.common.natsconn import connect
from services.common.settings import CommonSettings, JudgeSettings, NatsSettings, get
from services.judge.backends.base import create_backend
from services.judge.cache import KvJudgeCache
from services.judge.engine import Judge
from services.judge.models import JudgeReply, ReplyError, parse_request

__all__ = ["JudgeNames", "JudgeService", "judge_names", "run_judge_service"]

log = get_logger(__name__)

# Room for NATS headers and protocol framing inside max_payload.
PAYLOAD_HEADROOM = 4096


@dataclass(frozen=True)
class JudgeNames:
    """The judge's NATS resources: request subject, queue group and cache bucket."""

    subject: str
    queue_group: str
    cache_bucket: str


def judge_names(settings: JudgeSettings, nats_settings: NatsSettings | None = None) -> JudgeNames:
    """Explicit settings, else names derived from the job plane's namespace."""
    namespace = (nats_settings or get(NatsSettings)).namespace
    return JudgeNames(
        subject=settings.subject or f"{namespace}.judge.score",
        queue_group=settings.queue_group or f"{namespace}-judge",
        cache_bucket=settings.cache_bucket or f"{namespace}-judge-cache",
    )


class JudgeService:
    """Serves one ``Judge`` on a NATS subject in a queue group."""

    def __init__(
        self,
        nc: Any,
        judge: Judge,
        *,
        subject: str = "qsens.judge.score",
        queue_group: str = "qsens-judge",
        max_reply_bytes: int | None = None,
    ) -> None:
        self.nc = nc
        self.max_reply_bytes = max_reply_bytes
        self.judge = judge
        self.subject = subject
        self.queue_group = queue_group
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests_handled = 0

    async def start(self) -> None:
        """Start the backend and subscribe."""
        await self.judge.start()
        self._sub = await self.nc.subscribe(
            self.subject, queue=self.queue_group, cb=self._on_message
        )
        await self.nc.flush()
        log.info(
            "judge serving",
            extra={
                "subject": self.subject,
                "queue_group": self.queue_group,
                "backend": self.judge.backend.name,
                "model": self.judge.backend.model,
            },
        )

    async def _on_message(self, msg: Any) -> None:
        # nats-py runs a subscription's callbacks one at a time: hand each request to a task.
        task = asyncio.get_running_loop().create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Any) -> None:
        reply: JudgeReply
        request_id = ""
        try:
            request = parse_request(msg.data)
            request_id = request.request_id
            results = await self.judge.score(request)
            reply = JudgeReply(results=results)
        except InvalidArgument as exc:
            reply = JudgeReply(
                error=ReplyError(code="invalid_argument", field=exc.field, message=exc.message)
            )
        except Exception as exc:
            log.exception("judge request failed", extra={"request_id": request_id})
            reply = JudgeReply(
                error=ReplyError(code="internal", message=f"{type(exc).__name__}: {exc}"[:2000])
            )
        data = reply.model_dump_json().encode()
        limit = self.max_reply_bytes or int(self.nc.max_payload) - PAYLOAD_HEADROOM
        if len(data) > limit:
            data = (
                JudgeReply(
                    error=ReplyError(
                        code="too_large",
                        message=f"reply of {len(data)} bytes exceeds {limit}; send fewer items",
                    )
                )
                .model_dump_json()
                .encode()
            )
        self.requests_handled += 1
        if msg.reply:
            try:
                await msg.respond(data)
            except Exception as exc:  # the requester may have gone; its retry hits the cache
                log.warning("judge reply failed: %r", exc, extra={"request_id": request_id})

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, finish those in flight (up to ``grace_s``), then cancel."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


async def run_judge_service(
    settings: JudgeSettings | None = None,
    *,
    nats_settings: NatsSettings | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 30.0,
    metrics_port: int | None = None,
    ready_file: Path | None = None,
) -> None:
    """Run a judge service until SIGTERM/SIGINT (or ``stop`` is set).

    ``metrics_port`` overrides ``QSENS_METRICS_PORT`` (0: off). Once subscribed, the service
    writes ``ready_file`` (JSON: subject, queue group, backend, model, metrics port, pid).
    """
    settings = settings or get(JudgeSettings)
    common = get(CommonSettings)
    port = common.metrics_port if metrics_port is None else metrics_port
    if port:
        port = start_metrics_server(port, common.metrics_host)
        log.info("judge metrics on %s:%d", common.metrics_host, port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    nats_settings = nats_settings or get(NatsSettings)
    names = judge_names(settings, nats_settings)
    nc = await connect(nats_settings, name="qsens-judge")
    judge: Judge | None = None
    service: JudgeService | None = None
    try:
        cache = await KvJudgeCache.open(
            nc.jetstream(), names.cache_bucket, settings.cache_ttl_s, nats_settings.replicas
        )
        judge = Judge(create_backend(settings), cache, settings)
        service = JudgeService(nc, judge, subject=names.subject, queue_group=names.queue_group)
        await service.start()
        if ready_file is not None:
            ready = {
                "subject": names.subject,
                "queue_group": names.queue_group,
                "cache_bucket": names.cache_bucket,
                "backend": judge.backend.name,
                "model": judge.backend.model,
                "metrics_port": port,
                "pid": os.getpid(),
            }
            write_ready_file(ready_file, ready)
        await stop.wait()
        log.info("judge draining")
    finally:
        if service is not None:
            await service.stop(grace_s)
        if judge is not None:
            await judge.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
