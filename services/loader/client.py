"""The Python client workers use to talk to a loader (async gRPC, numpy in and out).

Requests larger than the server's item limit are split transparently; every call can pin the
variant it expects (``expect_variant``) so a worker never reads from the wrong model.

Every call (Info and health included) carries the loader token and dials TLS when the
environment names them (``QSENS_LOADER_TOKEN[_FILE]``, ``QSENS_LOADER_TLS_CA``; see
``services.common.auth``); a refused token raises ``Unauthenticated``.

Busy loaders and deadlines
--------------------------
A loader runs one model pass at a time for every caller, admits a bounded number of requests
and refuses more with RESOURCE_EXHAUSTED plus ``retry-after-ms`` (trailing metadata). A job
must not fail because a loader was busy serving others, so each call has two budgets:

* ``timeout_s`` bounds the work itself. It travels as ``qsens-work-timeout-ms`` request
  metadata, and the loader starts counting it when the call's work starts on its model thread:
  time spent queued behind other callers never counts against it. Work that runs past it is
  stopped by the loader (DEADLINE_EXCEEDED).
* ``wait_s`` bounds waiting for the loader: refused attempts are retried after the advertised
  retry-after (times a jitter in [1, 1.5) so refused callers do not return in lock step), for
  as long as ``wait_s`` allows; a loader still busy after that raises ``Unavailable``, which
  the job plane retries later as a missing dependency instead of counting a failed attempt.

The gRPC deadline of an attempt is what is left of ``wait_s`` plus ``timeout_s``: a loader
that vanishes (or a model thread that hangs) is still noticed, while a queue wait never eats
into the work's own budget unless it alone outlasts ``wait_s``. A refusal carries no work, so
retrying it is always safe (a streamed Capture is refused before its first message).
Retries are logged at debug level and counted in
``qsens_loader_client_backpressure_retries_total`` and ``..._wait_seconds_total``.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import loader_channel
from services.common.errors import FailedPrecondition, Unavailable
from services.common.logging import get_logger
from services.common.tensor_codec import decode_numpy
from services.loader.backpressure import _raise, retry_after_s, with_backpressure
from services.loader.capabilities import capabilities_from_proto
from services.loader.client_types import (
    CaptureOutput,
    Chat,
    ContinuationScore,
    Generation,
    LoaderInfo,
    NextToken,
    PromptItem,
    ScoreItem,
    Steer,
    _tensor,
)
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.seeds import row_seed
from services.loader.work import PRIORITY_KEY, WORK_TIMEOUT_KEY

__all__ = [
    "CaptureOutput",
    "Chat",
    "ContinuationScore",
    "Generation",
    "LoaderClient",
    "LoaderInfo",
    "NextToken",
    "PromptItem",
    "ScoreItem",
    "Steer",
    "retry_after_s",
    "with_backpressure",
]

log = get_logger(__name__)
R = TypeVar("R")


class LoaderClient:
    """Async client for one loader address (``host:port``).

    ``timeout_s`` bounds each call's work, counted from when the loader starts it; ``wait_s``
    bounds how long a call waits for a busy loader (see the module docstring). ``priority``
    (``low``, ``normal``) is sent with every call: the judge's calls to a study's loader go
    low, so the loader starts every queued call of the study before them. ``attempts``
    counts the calls sent per RPC, refused attempts of a busy loader included.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 3600.0,
        wait_s: float = 3600.0,
        expect_variant: str | None = None,
        max_message_bytes: int = 512 * 1024 * 1024,
        priority: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.expect_variant = expect_variant
        self.attempts: collections.Counter[str] = collections.Counter()
        work_timeout = (WORK_TIMEOUT_KEY, str(max(1, round(timeout_s * 1000))))
        self._metadata: tuple[tuple[str, str], ...] = (
            (work_timeout, (PRIORITY_KEY, priority)) if priority else (work_timeout,)
        )
        # Sends the loader token and dials TLS when the environment names them.
        self._channel = loader_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.LoaderServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._info: LoaderInfo | None = None

    async def __aenter__(self) -> LoaderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll standard gRPC health until SERVING."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"loader at {self.address} not ready after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)

    async def _call(self, rpc: str, attempt: Callable[[float], Awaitable[R]]) -> R:
        async def counted(timeout: float) -> R:
            self.attempts[rpc] += 1
            return await attempt(timeout)

        return await with_backpressure(rpc, counted, timeout_s=self.timeout_s, wait_s=self.wait_s)

    def _options(self, padding_side: str | None, max_batch_size: int) -> pb.RunOptions:
        return pb.RunOptions(
            padding_side=pb.PADDING_SIDE_RIGHT if padding_side == "right" else pb.PADDING_SIDE_LEFT,
            max_batch_size=max_batch_size,
            expect_variant=self.expect_variant or "",
        )

    async def info(self) -> LoaderInfo:
        try:
            r = await self._stub.Info(pb.InfoRequest(), timeout=60)
        except grpc.aio.AioRpcError as exc:
            _raise(exc)
            raise
        if self.expect_variant and r.variant != self.expect_variant:
            # Every other call is checked by the server (RunOptions.expect_variant); Info here.
            raise FailedPrecondition(
                f"loader at {self.address} serves {r.variant}, expected {self.expect_variant}"
            )
        self._info = LoaderInfo(
            model=r.model,
            precision=r.precision,
            backend=r.backend,
            variant=r.variant,
            num_layers=r.num_layers,
            hidden_size=r.hidden_size,
            dtype=r.dtype,
            device=r.device,
            parameter_bytes=r.parameter_bytes,
            supports_chat_template=r.supports_chat_template,
            supports_system_role=r.supports_system_role,
            quantization_config=json.loads(r.quantization_config_json or "{}"),
            vocab_size=r.vocab_size,
            max_tokens_per_item=r.max_tokens_per_item,
            max_batch_items=r.max_batch_items,
            source=r.source,
            notes=list(r.notes),
            engine=r.engine,
            capabilities=capabilities_from_proto(r.engine, r.capabilities)
            if r.HasField("capabilities")
            else None,
        )
        return self._info

    async def _chunk_size(self) -> int:
        if self._info is None:
            await self.info()
        assert self._info is not None
        return max(1, self._info.max_batch_items)

    async def generate(
        self,
        items: Sequence[PromptItem],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        steering: Sequence[Steer] = (),
        vectors: Sequence[np.ndarray] = (),
        max_batch_size: int = 0,
    ) -> list[Generation]:
        size = await self._chunk_size()
        out: list[Generation] = []
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            request = pb.GenerateRequest(
                items=[
                    # Row seeds follow the global index so chunking never changes samples.
                    it.to_proto()
                    if it.seed is not None
                    else PromptItem(
                        it.prompt, it.response, it.steering, _seed(seed, start + k)
                    ).to_proto()
                    for k, it in enumerate(chunk)
                ],
                params=pb.GenerationParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    seed=seed,
                    stop=list(stop),
                    logprobs=logprobs,
                    top_logprobs=top_logprobs,
                ),
                steering=[s.to_proto() for s in steering],
                vectors=[_tensor(v) for v in vectors],
                options=self._options("left", max_batch_size),
            )

            async def attempt(timeout: float, request: pb.GenerateRequest = request) -> Any:
                return await self._stub.Generate(request, timeout=timeout, metadata=self._metadata)

            reply = await self._call("Generate", attempt)
            for g in reply.generations:
                out.append(
                    Generation(
                        text=g.text,
                        token_ids=list(g.token_ids),
                        finish_reason=g.finish_reason,
                        prompt_tokens=g.prompt_tokens,
                        logprobs=[
                            {
                                "token_id": s.chosen.token_id,
                                "token": s.chosen.token,
                                "logprob": s.chosen.logprob,
                                "top": [(t.token_id, t.token, t.logprob) for t in s.top],
                            }
                            for s in g.logprobs
                        ],
                    )
                )
        return out

    async def capture(
        self,
        items: Sequence[PromptItem],
        *,
        position: str,
        layers: Sequence[int] | None = None,
        reduction: Literal["mean", "last", "none"] = "mean",
        dtype: str = "float32",
        steering: Sequence[Steer] = (),
        vectors: Sequence[np.ndarray] = (),
        padding_side: Literal["left", "right"] = "left",
        max_batch_size: int = 0,
        chunk_items: int = 0,
    ) -> CaptureOutput:
        """Capture activations; ``layers=None`` means every layer."""
        size = await self._chunk_size()
        result = CaptureOutput([], [], [], [], [])
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            request = pb.CaptureRequest(
                items=[it.to_proto() for it in chunk],
                layers=list(layers or []),
                all_layers=layers is None,
                position=position,
                reduction={
                    "mean": pb.REDUCTION_MEAN,
                    "last": pb.REDUCTION_LAST,
                    "none": pb.REDUCTION_NONE,
                }[reduction],
                dtype=dtype,
                steering=[s.to_proto() for s in steering],
                vectors=[_tensor(v) for v in vectors],
                options=self._options(padding_side, max_batch_size),
                chunk_items=chunk_items,
            )

            async def attempt(
                timeout: float, request: pb.CaptureRequest = request
            ) -> CaptureOutput:
                # A fresh part per attempt: a refused attempt has streamed nothing.
                part = CaptureOutput([], [], [], [], [])
                stream = self._stub.Capture(request, timeout=timeout, metadata=self._metadata)
                async for reply in stream:
                    part.layers = list(reply.layers)
                    for item in reply.items:
                        t = item.activations
                        part.activations.append(decode_numpy(t.dtype, list(t.shape), t.data))
                        part.num_positions.append(item.num_positions)
                        part.prompt_tokens.append(item.prompt_tokens)
                        part.response_tokens.append(item.response_tokens)
                return part

            part = await self._call("Capture", attempt)
            result.layers = part.layers or result.layers
            result.activations.extend(part.activations)
            result.num_positions.extend(part.num_positions)
            result.prompt_tokens.extend(part.prompt_tokens)
            result.response_tokens.extend(part.response_tokens)
        return result

    async def score(
        self,
        items: Sequence[ScoreItem],
        *,
        steering: Sequence[Steer] = (),
        vectors: Sequence[np.ndarray] = (),
        token_logprobs: bool = False,
        max_batch_size: int = 0,
    ) -> list[list[ContinuationScore]]:
        size = await self._chunk_size()
        out: list[list[ContinuationScore]] = []
        for start in range(0, len(items), size):
            request = pb.ScoreRequest(
                items=[it.to_proto() for it in items[start : start + size]],
                steering=[s.to_proto() for s in steering],
                vectors=[_tensor(v) for v in vectors],
                options=self._options("left", max_batch_size),
                token_logprobs=token_logprobs,
            )

            async def attempt(timeout: float, request: pb.ScoreRequest = request) -> Any:
                return await self._stub.Score(request, timeout=timeout, metadata=self._metadata)

            reply = await self._call("Score", attempt)
            for r in reply.results:
                out.append(
                    [
                        ContinuationScore(
                            c.logprob,
                            c.num_tokens,
                            c.num_chars,
                            c.is_greedy,
                            list(c.token_logprobs),
                        )
                        for c in r.continuations
                    ]
                )
        return out

    async def next_token(
        self,
        items: Sequence[PromptItem],
        *,
        top_k: int = 10,
        token_ids: Sequence[int] = (),
        token_strings: Sequence[str] = (),
        steering: Sequence[Steer] = (),
        vectors: Sequence[np.ndarray] = (),
        padding_side: Literal["left", "right"] = "left",
        max_batch_size: int = 0,
    ) -> list[NextToken]:
        size = await self._chunk_size()
        out: list[NextToken] = []
        for start in range(0, len(items), size):
            request = pb.NextTokenRequest(
                items=[it.to_proto() for it in items[start : start + size]],
                top_k=top_k,
                token_ids=list(token_ids),
                token_strings=list(token_strings),
                steering=[s.to_proto() for s in steering],
                vectors=[_tensor(v) for v in vectors],
                options=self._options(padding_side, max_batch_size),
            )

            async def attempt(timeout: float, request: pb.NextTokenRequest = request) -> Any:
                return await self._stub.NextToken(request, timeout=timeout, metadata=self._metadata)

            reply = await self._call("NextToken", attempt)
            for r in reply.results:
                out.append(
                    NextToken(
                        top=[(t.token_id, t.token, t.logprob) for t in r.top],
                        stats={
                            "entropy": r.stats.entropy,
                            "logit_max": r.stats.logit_max,
                            "logit_min": r.stats.logit_min,
                            "logit_mean": r.stats.logit_mean,
                            "logit_std": r.stats.logit_std,
                            "gini": r.stats.gini,
                        },
                        requested_ids=list(r.requested_ids),
                        requested_logits=list(r.requested_logits),
                        requested_logprobs=list(r.requested_logprobs),
                    )
                )
        return out


def _seed(request_seed: int, index: int) -> int:
    return row_seed(request_seed, index)
