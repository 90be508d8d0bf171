"""The loader runtime: engine, model thread, bounded queue and the checks on its results.

Every piece of model work runs through ``LoaderRuntime.run`` on the one model thread, which
records queue wait, cancellations and the engine's counters in the loader metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

import services
from services.common.errors import InvalidArgument
from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader import convert, guards
from services.loader.capabilities import capabilities_to_proto
from services.loader.engine import CaptureResult, Engine, GenParams, GenResult
from services.loader.pb import loader_pb2 as pb
from services.loader.rpc_metrics import metrics
from services.loader.work import (
    Busy,
    CancelToken,
    ModelThread,
    Priority,
    Ticket,
    WorkCancelled,
    WorkQueue,
)

__all__ = ["LoaderRuntime", "check_capture", "check_generations"]

T = TypeVar("T")


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
        self._cancel_lock = threading.Lock()
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
            self.count_cancelled(ticket)

    def count_cancelled(self, ticket: Ticket) -> None:
        """Count ``ticket``'s request as cancelled, once however it was noticed (the event loop
        and the model thread both notice): "queued" if its work never started, else "running"
        (a later chunk of a streamed Capture that waited its turn included)."""
        stage = "queued" if ticket.token.started is None else "running"
        with self._cancel_lock:
            if ticket.cancelled_at is not None:
                return
            ticket.cancelled_at = stage
        metrics().cancelled.labels(ticket.rpc, stage).inc()

    def _call(self, fn: Callable[[], T], ticket: Ticket | None) -> T:
        token = ticket.token if ticket is not None else None
        m = metrics()
        if ticket is not None and token is not None:
            if token.cancelled:  # the caller left while this waited its turn
                self.count_cancelled(ticket)
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
                self.count_cancelled(ticket)
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
