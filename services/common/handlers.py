"""What a job handler is: the context it runs in, and the registry of handlers per job kind.

A service declares one ``KindHandler`` per job kind it serves: the kind's params contract
(``services.common.contracts``), where the job's result document lives and how a stored one
becomes the job-record summary, and the function that does the work. ``dispatch`` does the
rest once for every service: it validates the params (a malformed job is ``InvalidArgument``
and dead-lettered), returns the stored summary when the result already exists (a
redelivery after a crash: one S3 read, no work) and calls the function with typed params.

A plain ``Handler`` (``async (job, ctx) -> summary``) still works for kinds that manage
their own idempotency (the analyzer's manifest) and for the job plane's tests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from pydantic import BaseModel

from services.common.contracts.common import parse_params
from services.common.errors import InvalidArgument, NotFound
from services.common.jobs import Job, JobKind
from services.common.store import AsyncS3Store, run_key
from services.loader.capabilities import Needs

__all__ = [
    "Handler",
    "HandlerRegistry",
    "JobContext",
    "KindHandler",
    "dispatch",
    "registry_handler",
]

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


@dataclass
class JobContext:
    """What a handler gets besides its job."""

    job: Job
    attempt: int
    store: AsyncS3Store
    log: logging.LoggerAdapter[logging.Logger]
    worker_id: str
    _msg: Msg
    _find_loader: Callable[[str, Needs | None], Awaitable[str]]

    async def heartbeat(self) -> None:
        """Tell the server the job is still running (also sent on a timer)."""
        await self._msg.in_progress()

    async def find_loader(self, variant: str, needs: Needs | None = None) -> str:
        """Address of a live loader for ``variant`` whose engine covers ``needs`` (None: any);
        Unavailable (retried later) if none (``LoaderRegistry.find``)."""
        return await self._find_loader(variant, needs)

    def key(self, *parts: str) -> str:
        """An S3 key below this job's run (``runs/<run_id>/...``)."""
        return run_key(self.job.run_id, *parts)


Handler = Callable[[Job, JobContext], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class KindHandler(Generic[P, R]):
    """How one job kind is served: params contract, result document, and the work itself."""

    kind: JobKind
    params: type[P]
    run: Callable[[Job, P, JobContext], Awaitable[dict[str, Any] | None]]
    result: type[R] | None = None  # the stored result document's contract
    result_key: Callable[[str, P], str] | None = None  # run id, params -> its S3 key
    summary: Callable[[R, str], dict[str, Any]] | None = None  # stored result, key -> summary


HandlerRegistry = Mapping[JobKind, KindHandler[Any, Any]]


async def _stored(store: AsyncS3Store, key: str) -> Any | None:
    try:
        return await store.get_json(key)
    except NotFound:
        return None


async def dispatch(registry: HandlerRegistry, job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Parse ``job``'s params, skip it when its result exists, else run its kind's handler."""
    entry = registry.get(job.kind)
    if entry is None:
        served = sorted(k.value for k in registry)
        raise InvalidArgument("kind", f"this worker handles {served}, not {job.kind.value}")
    params = parse_params(entry.params, job.params)
    if entry.result_key is not None and entry.result is not None and entry.summary is not None:
        key = entry.result_key(job.run_id, params)
        done = await _stored(ctx.store, key)
        if done is not None:
            return entry.summary(entry.result.model_validate(done), key)
    return await entry.run(job, params, ctx)


def registry_handler(registry: HandlerRegistry) -> Handler:
    """A ``Handler`` that dispatches through ``registry``."""

    async def handle(job: Job, ctx: JobContext) -> dict[str, Any] | None:
        return await dispatch(registry, job, ctx)

    return handle
