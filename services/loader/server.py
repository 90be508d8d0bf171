"""The loader process: gRPC service, health, metrics, OpenAI-compatible HTTP, graceful drain.

All model work runs on one dedicated thread (the GPU is used by one pass at a time); the
asyncio server only parses, queues and streams. Requests that need the model are admitted to
a bounded queue (``work.WorkQueue``: RESOURCE_EXHAUSTED with ``retry-after-ms`` trailing
metadata when full) and carry a cancellation token tied to the call (its deadline, the client
cancelling or disconnecting), which the engine checks between micro-batches and decode steps.
The model thread (``work.ModelThread``) starts queued normal-priority work before any
low-priority work (``qsens-priority: low`` metadata, e.g. the judge's perplexity).
``Info`` and health never wait for the model thread: Info's facts are read once at load time
and health is answered by the event loop (a busy loader is still SERVING). One interceptor
maps qsens errors to gRPC status codes, frees accelerator memory after an OOM, counts
requests and times them. SIGTERM flips health to NOT_SERVING, refuses new calls and lets
in-flight ones finish within the grace period.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge, Histogram

import services
from services.common import auth
from services.common import settings as settings_mod
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QsensError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.localstack import write_ready_file
from services.common.logging import get_logger
from services.common.metrics import (
    LATENCY_BUCKETS,
    SIZE_BUCKETS,
    process_memory_bytes,
    start_metrics_server,
)
from services.common.settings import LoaderSettings
from services.common.variants import Precision, parse_precision
from services.loader import convert, guards
from services.loader.backends.registry import load_engine, resolve_backend
from services.loader.capabilities import capabilities_to_proto
from services.loader.engine import CaptureResult, Engine, GenParams, GenResult
from services.loader.model_source import resolve_source
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.positions import parse_position
from services.loader.work import (
    PRIORITY_KEY,
    RETRY_AFTER_KEY,
    WORK_TIMEOUT_KEY,
    Busy,
    CancelToken,
    ModelThread,
    Priority,
    Ticket,
    WorkCancelled,
    WorkQueue,
    parse_priority,
)

__all__ = ["LoaderRuntime", "build_runtime", "serve", "start_server"]

log = get_logger(__name__)
T = TypeVar("T")
SERVICE_NAME = "qsens.loader.v1.LoaderService"

_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_LAST: "last",
    pb.REDUCTION_NONE: "none",
}
_OUT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class _Metrics:
    requests: Counter
    errors: Counter
    latency: Histogram
    items: Histogram
    tokens: Counter
    tokens_per_s: Gauge
    inflight: Gauge
    oom: Counter
    memory: Gauge
    graphs_recorded: Counter
    graph_replays: Counter
    cancelled: Counter
    rejected: Counter
    pending: Gauge
    queue_wait: Histogram


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    """Loader metrics, registered on first use."""
    global _metrics
    if _metrics is None:
        memory = Gauge("qsens_loader_memory_bytes", "Memory in use.", ["kind"])
        memory.labels("rss").set_function(lambda: float(process_memory_bytes()))
        memory.labels("accelerator").set_function(
            lambda: float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0
        )
        _metrics = _Metrics(
            requests=Counter("qsens_loader_requests_total", "RPCs handled.", ["rpc", "code"]),
            errors=Counter("qsens_loader_errors_total", "RPCs that failed.", ["rpc", "code"]),
            latency=Histogram(
                "qsens_loader_request_seconds", "RPC latency.", ["rpc"], buckets=LATENCY_BUCKETS
            ),
            items=Histogram(
                "qsens_loader_batch_items", "Items per request.", ["rpc"], buckets=SIZE_BUCKETS
            ),
            tokens=Counter("qsens_loader_tokens_total", "Tokens run through the model.", ["rpc"]),
            tokens_per_s=Gauge(
                "qsens_loader_tokens_per_second", "Throughput of the last request.", ["rpc"]
            ),
            inflight=Gauge("qsens_loader_inflight_requests", "RPCs in progress."),
            oom=Counter("qsens_loader_oom_retries_total", "Batches halved after out-of-memory."),
            memory=memory,
            graphs_recorded=Counter(
                "qsens_loader_capture_graphs_recorded_total",
                "Capture shape buckets recorded (CUDA graphs on a GPU).",
            ),
            graph_replays=Counter(
                "qsens_loader_capture_graph_replays_total",
                "Capture batches served from a recorded bucket.",
            ),
            cancelled=Counter(
                "qsens_loader_cancelled_total",
                "Units of model work whose caller was gone: stopped while running, or never "
                "started (queued).",
                ["rpc", "stage"],
            ),
            rejected=Counter(
                "qsens_loader_rejected_total",
                "Requests refused because the queue of model work was full.",
                ["rpc", "priority"],
            ),
            pending=Gauge(
                "qsens_loader_pending_requests",
                "Requests admitted to the model thread (running or waiting).",
                ["priority"],
            ),
            queue_wait=Histogram(
                "qsens_loader_queue_wait_seconds",
                "Time from admission until a request's work first runs on the model thread.",
                ["priority"],
                buckets=LATENCY_BUCKETS,
            ),
        )
    return _metrics


class LoaderRuntime:
    """The engine plus what the RPCs share: its thread, queue, identity and limits."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str,
        precision: Precision,
        backend: str,
        source: str,
        settings: LoaderSettings,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.precision = precision
        self.backend = backend
        self.source = source
        self.settings = settings
        self.variant = f"{model_name}@{precision.value}"
        self.model_thread = ModelThread("model")
        self.queue = WorkQueue(settings.max_pending, max_pending_low=settings.max_pending_low)
        self.draining = False
        # Read once, before serving: Info must never wait behind model work.
        self._info = self._describe()

    @contextlib.contextmanager
    def admit(
        self, rpc: str, token: CancelToken, priority: Priority = "normal"
    ) -> Iterator[Ticket]:
        """A slot in the bounded queue for one request (``Busy`` when it is full)."""
        m = metrics()
        try:
            ticket = self.queue.admit(rpc, token, priority)
        except Busy:
            m.rejected.labels(rpc, priority).inc()
            raise
        m.pending.labels(priority).set(self.queue.pending_of(priority))
        try:
            yield ticket
        finally:
            self.queue.release(ticket)
            m.pending.labels(priority).set(self.queue.pending_of(priority))

    async def run(self, fn: Callable[[], T], ticket: Ticket | None = None) -> T:
        """Run ``fn`` on the model thread; if this coroutine is cancelled, so is the work."""
        future = self.submit(fn, ticket)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if ticket is not None:
                self.abandon(future, ticket, "cancelled")
            raise

    def submit(
        self, fn: Callable[[], T], ticket: Ticket | None = None
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn`` for the model thread (also from another thread: the HTTP server)."""
        priority = ticket.priority if ticket is not None else "normal"
        return self.model_thread.submit(self._call, fn, ticket, priority=priority)

    def abandon(self, future: concurrent.futures.Future[Any], ticket: Ticket, reason: str) -> None:
        """The caller is gone: never start ``future``; stop it at the next checkpoint if running."""
        token = ticket.token
        if not token.cancelled:  # a passed deadline is recorded as such
            token.cancel("deadline" if reason == "deadline" else "cancelled")
        if future.cancel():  # still queued: it will never run
            metrics().cancelled.labels(ticket.rpc, "queued").inc()

    def _call(self, fn: Callable[[], T], ticket: Ticket | None) -> T:
        token = ticket.token if ticket is not None else None
        m = metrics()
        if ticket is not None and token is not None:
            if token.cancelled:  # the caller left while this waited its turn
                m.cancelled.labels(ticket.rpc, "queued").inc()
                raise token.error()
            if token.started is None:  # a streamed Capture runs here once per chunk
                m.queue_wait.labels(ticket.priority).observe(time.monotonic() - ticket.admitted)
            token.start()
        delay = self.settings.fault_delay_s
        if delay and token is not None:
            token.sleep(delay)
        elif delay:
            time.sleep(delay)
        engine = self.engine
        before = engine.counters()
        started = time.perf_counter()
        engine.checkpoint = token.check if token is not None else _never_cancelled
        try:
            if token is not None:
                token.check()
            with torch.inference_mode():
                return fn()
        except WorkCancelled:
            if ticket is not None:
                m.cancelled.labels(ticket.rpc, "running").inc()
            raise
        finally:
            engine.checkpoint = _never_cancelled
            if ticket is not None:
                ticket.busy_s += time.perf_counter() - started
            after = engine.counters()
            for counter, key in (
                (m.oom, "oom_retries"),
                (m.graphs_recorded, "graphs_recorded"),
                (m.graph_replays, "graph_replays"),
            ):
                if after[key] > before[key]:
                    counter.inc(after[key] - before[key])

    def _describe(self) -> pb.InfoResponse:
        d = self.engine.describe()
        return pb.InfoResponse(
            model=self.model_name,
            precision=self.precision.value,
            backend=self.backend,
            variant=self.variant,
            num_layers=d.num_layers,
            hidden_size=d.hidden_size,
            dtype=d.dtype,
            device=d.device,
            parameter_bytes=d.parameter_bytes,
            supports_chat_template=d.supports_chat_template,
            supports_system_role=d.supports_system_role,
            quantization_config_json=json.dumps(d.quantization_config, sort_keys=True, default=str),
            vocab_size=d.vocab_size,
            max_tokens_per_item=self.settings.max_tokens_per_item,
            max_batch_items=self.settings.max_batch_items,
            source=self.source,
            notes=d.notes,
            server_version=services.__version__,
            engine=self.engine.name,
            capabilities=capabilities_to_proto(self.engine.capabilities),
        )

    def info(self) -> pb.InfoResponse:
        """Info without the model thread: load-time facts plus notes read without a lock."""
        reply = pb.InfoResponse()
        reply.CopyFrom(self._info)
        for note in self.engine.live_notes():  # e.g. capture graphs off after a failed recording
            if note not in reply.notes:
                reply.notes.append(note)
        return reply

    def generate(self, request: pb.GenerateRequest) -> tuple[list[GenResult], int]:
        """Validate and generate (on the model thread); returns results and tokens processed."""
        ctx = convert.RequestContext(
            self.engine, self.settings, self.variant, request.options, request.vectors
        )
        params = convert.gen_params(request.params, self.settings)
        items = convert.engine_items(
            ctx,
            request.items,
            request.steering,
            seed=request.params.seed,
            extra_tokens=params.max_new_tokens,
            use_response=False,
        )
        before = self.engine.tokens_processed
        steered = [bool(it.steering) for it in items]
        # Overflowing steering makes NaN logits that sampling turns into plausible token ids;
        # the chosen tokens' log-probs (cheap next to a decode step) show it.
        watch = any(steered) and not params.logprobs
        run = dataclasses.replace(params, logprobs=True, top_logprobs=0) if watch else params
        results = self.engine.generate(items, run, max_rows=ctx.max_rows)
        check_generations(results, steered)
        if watch:
            for result in results:
                result.logprobs = None
        return results, self.engine.tokens_processed - before

    def generate_chat(
        self, messages: list[tuple[str, str]], params: GenParams, seed: int, n: int
    ) -> list[GenResult]:
        """The OpenAI endpoint's path: one chat, ``n`` samples."""
        from services.loader.engine import ChatPrompt, EngineItem
        from services.loader.seeds import row_seed

        limit = self.settings.max_tokens_per_item
        guards.check_prompt_chars(self.engine, limit, (c for _r, c in messages), "messages")
        prompt_ids = self.engine.encode_prompt(ChatPrompt(tuple(messages)), "messages")
        if len(prompt_ids) + params.max_new_tokens > self.settings.max_tokens_per_item:
            raise InvalidArgument(
                "max_tokens", "prompt plus max_tokens exceed the loader's token limit"
            )
        items = [EngineItem(prompt_ids, [], [], row_seed(seed, i)) for i in range(n)]
        results = self.engine.generate(items, params)
        check_generations(results, [False] * n, "messages")
        return results


class LoaderServicer(pb_grpc.LoaderServiceServicer):
    """The five RPCs; validation and compute run on the model thread."""

    def __init__(self, runtime: LoaderRuntime) -> None:
        self.rt = runtime

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        return self.rt.info()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        started = time.perf_counter()
        with self.rt.admit("Generate", call_token(context), call_priority(context)) as ticket:
            results, tokens = await self.rt.run(lambda: self.rt.generate(request), ticket)
        _throughput("Generate", tokens, started)
        return pb.GenerateResponse(generations=[convert.generation(r) for r in results])

    async def Capture(
        self, request: pb.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CaptureResponse]:
        started = time.perf_counter()
        engine = self.rt.engine
        before = engine.tokens_processed

        def prepare() -> tuple[Iterator[Any], list[int], str]:
            ctx = convert.RequestContext(
                engine, self.rt.settings, self.rt.variant, request.options, request.vectors
            )
            layers = convert.capture_layers(ctx, request.layers, request.all_layers)
            if not request.position:
                raise InvalidArgument("position", "required (e.g. prompt[-1] or response[:])")
            position = parse_position(request.position)
            reduction = _REDUCTIONS.get(request.reduction)
            if reduction is None:
                raise InvalidArgument("reduction", f"unknown value {request.reduction}")
            dtype = request.dtype or "float32"
            if dtype not in _OUT_DTYPES:
                raise InvalidArgument(
                    "dtype", f"unsupported output dtype {dtype!r} ({', '.join(_OUT_DTYPES)})"
                )
            if request.chunk_items < 0:
                raise InvalidArgument("chunk_items", "must be >= 0")
            items = convert.engine_items(ctx, request.items, request.steering)
            chunk = request.chunk_items or _default_chunk(
                len(layers), engine.hidden_size, reduction
            )
            gen = engine.capture(
                items,
                layers,
                position,
                reduction,  # type: ignore[arg-type]
                padding_side=ctx.padding_side,
                max_rows=ctx.max_rows,
                chunk_items=chunk,
            )
            steered = [bool(it.steering) for it in items]
            checked = (check_capture(chunk, steered, dtype) for chunk in gen)
            # Pull the first chunk here so that item validation errors come before any data.
            first = next(checked, None)
            return _prepend(first, checked), layers, dtype

        with self.rt.admit("Capture", call_token(context), call_priority(context)) as ticket:
            chunks, layers, dtype = await self.rt.run(prepare, ticket)
            while True:
                results = await self.rt.run(lambda: next(chunks, None), ticket)
                if results is None:
                    break
                yield convert.capture_chunk(results, layers, dtype)
        _throughput("Capture", engine.tokens_processed - before, started)

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        started = time.perf_counter()
        engine = self.rt.engine

        def work() -> tuple[pb.ScoreResponse, int]:
            before = engine.tokens_processed
            ctx = convert.RequestContext(
                engine, self.rt.settings, self.rt.variant, request.options, request.vectors
            )
            inputs = convert.score_inputs(ctx, request)
            scores = engine.score(
                inputs,
                token_logprobs=request.token_logprobs,
                padding_side=ctx.padding_side,
                max_rows=ctx.max_rows,
            )
            for i, (item, per_item) in enumerate(zip(inputs, scores, strict=True)):
                values = [v for c in per_item for v in (c.logprob, *c.token_logprobs)]
                guards.check_finite(values, "log-probs", f"items[{i}]", bool(item.steering))
            return (
                pb.ScoreResponse(results=[convert.score_result(s) for s in scores]),
                engine.tokens_processed - before,
            )

        with self.rt.admit("Score", call_token(context), call_priority(context)) as ticket:
            response, tokens = await self.rt.run(work, ticket)
        _throughput("Score", tokens, started)
        return response

    async def NextToken(
        self, request: pb.NextTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.NextTokenResponse:
        started = time.perf_counter()
        engine = self.rt.engine

        def work() -> tuple[pb.NextTokenResponse, int]:
            before = engine.tokens_processed
            ctx = convert.RequestContext(
                engine, self.rt.settings, self.rt.variant, request.options, request.vectors
            )
            top_k, ids = convert.next_token_ids(ctx, request)
            items = convert.engine_items(ctx, request.items, request.steering)
            results = engine.next_token(
                items,
                top_k=top_k,
                token_ids=ids,
                padding_side=ctx.padding_side,
                max_rows=ctx.max_rows,
            )
            for i, (item, r) in enumerate(zip(items, results, strict=True)):
                values = [
                    *(lp for _t, _s, lp in r.top),
                    *r.stats.values(),
                    *r.requested_logits,
                    *r.requested_logprobs,
                ]
                guards.check_finite(values, "logits", f"items[{i}]", bool(item.steering))
            return (
                pb.NextTokenResponse(results=[convert.next_token_result(r) for r in results]),
                engine.tokens_processed - before,
            )

        with self.rt.admit("NextToken", call_token(context), call_priority(context)) as ticket:
            response, tokens = await self.rt.run(work, ticket)
        _throughput("NextToken", tokens, started)
        return response


def _never_cancelled() -> None:
    return None


def check_generations(
    results: list[GenResult], steered: list[bool], field: str = "items[{i}]"
) -> None:
    """Refuse generations whose log-probs are NaN/inf (an overflowing model or steering)."""
    for i, (result, was_steered) in enumerate(zip(results, steered, strict=True)):
        values = [
            v
            for step in result.logprobs or ()
            for v in (step.chosen[2], *(lp for _t, _s, lp in step.top))
        ]
        guards.check_finite(values, "log-probs", field.format(i=i), was_steered)


def check_capture(
    chunk: list[CaptureResult], steered: list[bool], dtype: str
) -> list[CaptureResult]:
    """``chunk`` unchanged when its activations are finite in float32 and in ``dtype``."""
    out_dtype = getattr(torch, dtype)
    for res in chunk:
        field = f"items[{res.index}]"
        guards.check_finite(res.activations, "activations", field, steered[res.index])
        if out_dtype != res.activations.dtype and not bool(
            torch.isfinite(res.activations.to(out_dtype)).all()
        ):
            raise InvalidArgument(
                "dtype", f"{field}: activations exceed the range of {dtype}; ask for float32"
            )
    return chunk


def call_token(context: grpc.aio.ServicerContext) -> CancelToken:
    """A token for one gRPC call: its deadline, the client cancelling, and the work timeout.

    The work timeout (``qsens-work-timeout-ms`` request metadata) starts when the work starts
    on the model thread: time spent waiting behind other callers never counts against it.
    """
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None
    work_timeout_s: float | None = None
    for key, value in context.invocation_metadata() or ():
        if key == WORK_TIMEOUT_KEY:
            try:
                work_timeout_s = max(0.0, float(value) / 1000.0)
            except ValueError:
                raise InvalidArgument(
                    f"metadata.{WORK_TIMEOUT_KEY}", f"not a number of milliseconds: {value!r}"
                ) from None
    token = CancelToken(deadline, work_timeout_s=work_timeout_s)
    # Also fires after a normal end, when cancelling is a no-op.
    context.add_done_callback(lambda _context: token.cancel("cancelled"))
    return token


def call_priority(context: grpc.aio.ServicerContext) -> Priority:
    """The call's priority (``qsens-priority`` request metadata; normal when absent)."""
    for key, value in context.invocation_metadata() or ():
        if key == PRIORITY_KEY:
            return parse_priority(str(value))
    return "normal"


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    if first is not None:
        yield first
    yield from rest


def _default_chunk(layers: int, hidden: int, reduction: str) -> int:
    # Keep streamed messages near 16 MB: large captures never build one giant reply.
    per_item = layers * hidden * 4 * (64 if reduction == "none" else 1)
    return max(1, min(256, (16 * 1024 * 1024) // max(1, per_item)))


def _throughput(rpc: str, tokens: int, started: float) -> None:
    elapsed = max(1e-9, time.perf_counter() - started)
    m = metrics()
    m.tokens.labels(rpc).inc(tokens)
    m.tokens_per_s.labels(rpc).set(tokens / elapsed)


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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
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


def build_runtime(
    model: str,
    precision: str,
    *,
    backend: str | None = None,
    device: str = "auto",
    name: str | None = None,
    settings: LoaderSettings | None = None,
    engine_name: str | None = None,
) -> LoaderRuntime:
    """Resolve the source and load it through the registered engine of its backend
    (``services.loader.backends.registry``) into a runtime."""
    prec = parse_precision(precision, "precision")
    chosen = resolve_backend(prec, backend, engine_name)  # before any download
    common = settings_mod.get(settings_mod.CommonSettings)
    source = resolve_source(model, common.cache_dir, name)
    started = time.perf_counter()
    limits = settings or settings_mod.get(LoaderSettings)
    engine = load_engine(source, prec, backend=chosen.name, device=device, settings=limits)
    health_now = engine.health()
    if not health_now.ok:
        raise Unavailable(
            f"engine {engine.name!r} is not healthy after loading: {health_now.detail}"
        )
    log.info(
        "model loaded",
        extra={
            "variant": f"{source.name}@{prec.value}",
            "backend": chosen.name,
            "engine": engine.name,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return LoaderRuntime(
        engine,
        model_name=source.name,
        precision=prec,
        backend=chosen.name,
        source=source.source,
        settings=limits,
    )


@dataclass
class RunningServer:
    """Handles of a started loader (gRPC + health + optional HTTP)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    http_port: int
    runtime: LoaderRuntime
    http_thread: threading.Thread | None = None
    http_server: Any = None
    tls: bool = False

    async def drain(self, grace: float) -> None:
        """Refuse new calls and wait up to ``grace`` seconds for in-flight ones."""
        self.runtime.draining = True
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.http_server is not None:
            self.http_server.should_exit = True
        if self.http_thread is not None:
            self.http_thread.join(timeout=5)
        self.runtime.model_thread.shutdown(wait=False, cancel_futures=True)


async def start_server(
    runtime: LoaderRuntime,
    *,
    host: str,
    port: int,
    http_port: int = 0,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start gRPC (and HTTP when ``http_port`` is set) for ``runtime``.

    The token and TLS files come from ``env`` (default: the process environment; see
    ``services.common.auth``); without a token both endpoints are open, as before.
    """
    token = auth.loader_token(env)
    tls = auth.server_tls(env)
    limit = runtime.settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(runtime, token)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_LoaderServiceServicer_to_server(LoaderServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.grpc_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise Unavailable(f"cannot bind gRPC on {host}:{port} (in use?)")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, health_servicer, bound, 0, runtime, tls=tls is not None)
    if http_port:  # 0 disables; -1 picks a free port
        from services.loader.openai_http import start_http

        running.http_server, running.http_thread, running.http_port = start_http(
            runtime, host, max(http_port, 0), token=token, tls=tls
        )
    log.info(
        "loader serving",
        extra={
            "variant": runtime.variant,
            "port": bound,
            "http_port": running.http_port,
            "token": token is not None,
            "tls": tls is not None,
        },
    )
    return running


async def serve(
    model: str,
    precision: str,
    *,
    backend: str | None = None,
    engine: str | None = None,
    device: str = "auto",
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    http_port: int | None = None,
    metrics_port: int | None = None,
    ready_file: str | None = None,
    announce: bool = False,
) -> None:
    """Run a loader until SIGTERM/SIGINT, then drain."""
    limits = settings_mod.get(LoaderSettings)
    common = settings_mod.get(settings_mod.CommonSettings)
    # A bad token file or half a TLS pair fails now, not after minutes of loading weights.
    auth.loader_token()
    auth.server_tls()
    runtime = build_runtime(
        model,
        precision,
        backend=backend,
        device=device,
        name=name,
        settings=limits,
        engine_name=engine,
    )
    mport = common.metrics_port if metrics_port is None else metrics_port
    bound_metrics = start_metrics_server(mport, common.metrics_host) if mport else 0
    running = await start_server(
        runtime,
        host=host or limits.host,
        port=limits.port if port is None else port,
        http_port=limits.http_port if http_port is None else http_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announcer: asyncio.Task[None] | None = None
    if announce:
        from services.common.loader_registry import announce_forever

        bind = limits.advertise_host or host or limits.host
        if bind in ("0.0.0.0", "::", ""):
            bind = socket.getfqdn()
        scheme = "https" if running.tls else "http"
        metadata = (
            {"http": f"{scheme}://{bind}:{running.http_port}/v1"} if running.http_port else {}
        )
        announcer = asyncio.create_task(
            announce_forever(runtime.variant, f"{bind}:{running.port}", metadata=metadata)
        )
    if ready_file:
        write_ready_file(
            ready_file,
            {
                "port": running.port,
                "http_port": running.http_port,
                "metrics_port": bound_metrics,
                "variant": runtime.variant,
            },
        )
    await stop.wait()
    log.info("draining", extra={"grace_s": limits.grace_period_s})
    if announcer is not None:
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await announcer
    await running.drain(limits.grace_period_s)
    log.info("stopped")
