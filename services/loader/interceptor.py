"""The loader's gRPC server interceptor: token check, request parsing, status codes, metrics.

qsens errors map to gRPC status codes here; an out-of-memory error frees accelerator memory
and a full queue answers RESOURCE_EXHAUSTED with ``retry-after-ms`` trailing metadata.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from services.common import auth
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
from services.loader.rpc_metrics import metrics
from services.loader.runtime import LoaderRuntime
from services.loader.work import (
    RETRY_AFTER_KEY,
    Busy,
    WorkCancelled,
)

__all__ = ["SERVICE_NAME", "ErrorInterceptor"]

log = get_logger(__name__)

SERVICE_NAME = "qsens.loader.v1.LoaderService"


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, WorkCancelled):
        if exc.reason == "deadline":
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, ResourceExhausted | torch.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, QsensError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc: Any base
    """Checks the token, parses requests, maps exceptions to status codes, refuses calls while
    draining and records metrics.

    With a token set, every call but gRPC health must carry ``authorization: Bearer <token>``
    (UNAUTHENTICATED otherwise, before the request is even parsed). Requests are parsed here
    rather than by gRPC so that bytes that are no valid message get INVALID_ARGUMENT, not the
    UNKNOWN a failed deserializer gives.
    """

    def __init__(self, runtime: LoaderRuntime, token: str | None = None) -> None:
        self.rt = runtime
        self.token = token

    def authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if self.token is None:
            return True
        return any(
            key == auth.AUTH_KEY and auth.bearer_matches(value, self.token)
            for key, value in details.invocation_metadata or ()
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or method.startswith(_HEALTH_PREFIX):
            return handler  # probes stay open; unknown methods get UNIMPLEMENTED
        if not method.startswith(f"/{SERVICE_NAME}/") and self.authorized(handler_call_details):
            return handler
        call = _GuardedCall(
            self.rt, method.rsplit("/", 1)[-1], handler, self.authorized(handler_call_details)
        )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                call.unary, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                call.stream, response_serializer=handler.response_serializer
            )
        return handler


_HEALTH_PREFIX = "/grpc.health.v1.Health/"


class _GuardedCall:
    """One call through ``ErrorInterceptor``: its checks, its handler and its metrics."""

    def __init__(
        self, runtime: LoaderRuntime, rpc: str, handler: grpc.RpcMethodHandler, authorized: bool
    ) -> None:
        self.rt = runtime
        self.rpc = rpc
        self.handler = handler
        self.authorized = authorized
        self.m = metrics()

    def request(self, raw: Any) -> Any:
        """The parsed request, once the call may run at all."""
        if not self.authorized:
            raise Unauthenticated("missing or wrong loader token (authorization: Bearer ...)")
        if self.rt.draining:
            raise Unavailable("the loader is shutting down")
        parse = self.handler.request_deserializer
        try:
            request = parse(raw) if parse is not None else raw
        except (DecodeError, ValueError, TypeError) as exc:
            raise InvalidArgument("request", f"not a valid {self.rpc} request: {exc}") from None
        items = getattr(request, "items", None)
        if items is not None:
            self.m.items.labels(self.rpc).observe(len(items))
        return request

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, message = _status_for(exc)
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, Busy):
            trailing = ((RETRY_AFTER_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if code is grpc.StatusCode.INTERNAL:
            log.exception("rpc failed", extra={"rpc": self.rpc})
        self.m.requests.labels(self.rpc, code.name).inc()
        self.m.errors.labels(self.rpc, code.name).inc()
        await context.abort(code, message, trailing_metadata=trailing)

    async def unary(self, raw: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        self.m.inflight.inc()
        try:
            response = await self.handler.unary_unary(self.request(raw), context)
            self.m.requests.labels(self.rpc, "OK").inc()
            return response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except BaseException as exc:
            await self.fail(context, exc)
        finally:
            self.m.inflight.dec()
            self.m.latency.labels(self.rpc).observe(time.perf_counter() - started)

    async def stream(self, raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        self.m.inflight.inc()
        try:
            async for response in self.handler.unary_stream(self.request(raw), context):
                yield response
            self.m.requests.labels(self.rpc, "OK").inc()
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except BaseException as exc:
            await self.fail(context, exc)
        finally:
            self.m.inflight.dec()
            self.m.latency.labels(self.rpc).observe(time.perf_counter() - started)
