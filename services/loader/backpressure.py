"""Loader errors to qsens errors, and retrying a busy loader's refusals within a wait budget.

The policy (work and wait budgets, retry-after with jitter) is described in
``services.loader.client``'s module docstring.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from prometheus_client import Counter

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QsensError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.logging import get_logger
from services.loader.work import RETRY_AFTER_KEY

__all__ = ["retry_after_s", "with_backpressure"]

log = get_logger(__name__)
R = TypeVar("R")
# Each refused caller sleeps retry-after times a factor in this range.
RETRY_JITTER = (1.0, 1.5)


def _raise(exc: grpc.aio.AioRpcError) -> None:
    code = exc.code()
    message = exc.details() or str(code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, rest = message.partition(": ")
        raise InvalidArgument(field, rest or message) from exc
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        raise FailedPrecondition(message) from exc
    if code == grpc.StatusCode.NOT_FOUND:
        raise NotFound(message) from exc
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise ResourceExhausted(message) from exc
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise Unauthenticated(
            f"loader: {message} (set QSENS_LOADER_TOKEN or QSENS_LOADER_TOKEN_FILE)"
        ) from exc
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        raise Unavailable(f"loader: {message}") from exc
    raise QsensError(f"loader error {code.name}: {message}") from exc


_retries: Counter | None = None
_waited: Counter | None = None


def _backpressure_metrics() -> tuple[Counter, Counter]:
    global _retries, _waited
    if _retries is None or _waited is None:
        _retries = Counter(
            "qsens_loader_client_backpressure_retries_total",
            "Loader calls refused as busy and retried after the loader's retry-after.",
            ["rpc"],
        )
        _waited = Counter(
            "qsens_loader_client_backpressure_wait_seconds_total",
            "Seconds spent waiting to retry calls a busy loader refused.",
            ["rpc"],
        )
    return _retries, _waited


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The loader's retry-after of a busy refusal, or None for any other error."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value) / 1000.0)
            except ValueError:
                return None
    return None  # out of memory on one item: retrying would not help


async def with_backpressure(
    rpc: str,
    attempt: Callable[[float], Awaitable[R]],
    *,
    timeout_s: float,
    wait_s: float,
) -> R:
    """``attempt(grpc_timeout)``, retried while the loader refuses it as busy (module doc).

    Other gRPC errors become qsens errors; a loader still busy after ``wait_s`` raises
    ``Unavailable``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        waited = loop.time() - started
        try:
            return await attempt(max(0.0, wait_s - waited) + timeout_s)
        except grpc.aio.AioRpcError as exc:
            delay = retry_after_s(exc)
            if delay is None:
                _raise(exc)
                raise
            pause = delay * random.uniform(*RETRY_JITTER)
            if waited + pause > wait_s:
                raise Unavailable(
                    f"loader busy for longer than the {wait_s:g} s wait budget: {exc.details()}"
                ) from exc
            retries, seconds = _backpressure_metrics()
            retries.labels(rpc).inc()
            seconds.labels(rpc).inc(pause)
            log.debug(
                "loader busy; retrying",
                extra={"rpc": rpc, "retry_after_s": delay, "sleep_s": round(pause, 3)},
            )
            await asyncio.sleep(pause)
