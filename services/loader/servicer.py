"""The five loader RPCs (Info, Generate, Capture, Score, NextToken) and their call metadata.

Each RPC admits its request to the runtime's queue with a cancellation token tied to the call
and runs validation and compute on the model thread.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from services.common.errors import InvalidArgument
from services.loader import convert, guards
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.positions import parse_position
from services.loader.rpc_metrics import throughput
from services.loader.runtime import LoaderRuntime, check_capture
from services.loader.work import (
    PRIORITY_KEY,
    WORK_TIMEOUT_KEY,
    CancelToken,
    Priority,
    parse_priority,
)

__all__ = ["LoaderServicer", "call_priority", "call_token"]


_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: "mean",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_LAST: "last",
    pb.REDUCTION_NONE: "none",
}
_OUT_DTYPES = ("float32", "float16", "bfloat16")


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
        throughput("Generate", tokens, started)
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
            finished = False
            try:
                chunks, layers, dtype = await self.rt.run(prepare, ticket)
                while True:
                    results = await self.rt.run(lambda: next(chunks, None), ticket)
                    if results is None:
                        break
                    yield convert.capture_chunk(results, layers, dtype)
                finished = True
            finally:
                # The caller may leave between chunks (while one is sent): the chunks after it
                # are never sent (on a GPU those of the same window were already computed with
                # it, the later windows never run), and the request counts as cancelled like
                # one stopped mid-chunk.
                if not finished and ticket.token.cancelled:
                    self.rt.count_cancelled(ticket)
        throughput("Capture", engine.tokens_processed - before, started)

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
        throughput("Score", tokens, started)
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
        throughput("NextToken", tokens, started)
        return response


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
