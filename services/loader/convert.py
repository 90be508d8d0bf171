"""Protobuf requests -> validated engine inputs, and engine results -> protobuf responses.

Every check raises ``InvalidArgument`` whose field path points at the offending value
(``items[2].steering[0].layers[1]``), so the client can fix its request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.settings import LoaderSettings
from services.common.tensor_codec import WIRE_DTYPES, decode_torch
from services.common.variants import Variant
from services.loader import guards
from services.loader.engine import (
    CaptureResult,
    ChatPrompt,
    ContinuationScore,
    Engine,
    EngineItem,
    GenParams,
    GenResult,
    NextTokenResult,
    ScoreInput,
    row_seed,
)
from services.loader.pb import loader_pb2 as pb
from services.loader.steering import SteerSpec, resolve_layer, validate_vector

__all__ = [
    "RequestContext",
    "capture_chunk",
    "capture_layers",
    "engine_items",
    "gen_params",
    "generation",
    "next_token_ids",
    "next_token_result",
    "score_inputs",
    "score_result",
]

_MODES: dict[int, Literal["add", "ablate"]] = {
    pb.STEERING_MODE_ADD: "add",
    pb.STEERING_MODE_ABLATE: "ablate",
}
_WHERE: dict[int, Literal["prompt", "response", "all"]] = {
    pb.STEERING_POSITIONS_UNSPECIFIED: "all",
    pb.STEERING_POSITIONS_PROMPT: "prompt",
    pb.STEERING_POSITIONS_RESPONSE: "response",
    pb.STEERING_POSITIONS_ALL: "all",
}


def tensor_to_torch(t: pb.Tensor, field: str) -> torch.Tensor:
    """Decode a wire tensor, naming ``field`` on malformed input."""
    if t.dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"{field}.dtype", f"unknown dtype {t.dtype!r}")
    return decode_torch(t.dtype, list(t.shape), t.data, field)  # type: ignore[no-any-return]


class RequestContext:
    """What every request shares: the engine, the limits, the vector table, options."""

    def __init__(
        self,
        engine: Engine,
        settings: LoaderSettings,
        variant: str,
        options: pb.RunOptions,
        vectors: Sequence[pb.Tensor],
    ) -> None:
        self.engine = engine
        self.settings = settings
        if options.expect_variant:
            expected = Variant.parse(options.expect_variant, "options.expect_variant")
            if str(expected) != variant:
                raise FailedPrecondition(
                    f"options.expect_variant: this loader serves {variant}, not {expected}"
                )
        if options.max_batch_size < 0:
            raise InvalidArgument("options.max_batch_size", "must be >= 0")
        self.max_rows = options.max_batch_size
        self.padding_side: Literal["left", "right"] = (
            "right" if options.padding_side == pb.PADDING_SIDE_RIGHT else "left"
        )
        self.vectors = [
            validate_vector(
                tensor_to_torch(v, f"vectors[{i}]"), engine.hidden_size, f"vectors[{i}]"
            )
            for i, v in enumerate(vectors)
        ]

    def steering(self, specs: Sequence[pb.SteeringSpec], field: str) -> list[SteerSpec]:
        """Validate specs: layers, vector (inline or by reference), coefficient, mode."""
        out: list[SteerSpec] = []
        num_layers = self.engine.num_layers
        for k, spec in enumerate(specs):
            path = f"{field}[{k}]"
            if not spec.layers:
                raise InvalidArgument(f"{path}.layers", "at least one layer is required")
            layers = tuple(
                sorted(
                    {
                        resolve_layer(layer, num_layers, f"{path}.layers[{j}]")
                        for j, layer in enumerate(spec.layers)
                    }
                )
            )
            which = spec.WhichOneof("direction")
            if which == "vector":
                vector = validate_vector(
                    tensor_to_torch(spec.vector, f"{path}.vector"),
                    self.engine.hidden_size,
                    f"{path}.vector",
                )
            elif which == "vector_ref":
                if not 0 <= spec.vector_ref < len(self.vectors):
                    raise InvalidArgument(
                        f"{path}.vector_ref",
                        f"index {spec.vector_ref} is outside the request's {len(self.vectors)} vectors",
                    )
                vector = self.vectors[spec.vector_ref]
            else:
                raise InvalidArgument(f"{path}.vector", "a vector or vector_ref is required")
            if not math.isfinite(spec.coefficient):
                raise InvalidArgument(f"{path}.coefficient", "must be finite")
            mode = _MODES.get(spec.mode)
            if mode is None:
                raise InvalidArgument(
                    f"{path}.mode", "set STEERING_MODE_ADD or STEERING_MODE_ABLATE"
                )
            where = _WHERE.get(spec.positions)
            if where is None:
                raise InvalidArgument(f"{path}.positions", f"unknown value {spec.positions}")
            out.append(SteerSpec(layers, vector, float(spec.coefficient), mode, where))
        return out


def _check_batch(count: int, settings: LoaderSettings) -> None:
    if count == 0:
        raise InvalidArgument("items", "the batch is empty")
    if count > settings.max_batch_items:
        raise InvalidArgument(
            "items", f"{count} items exceed the limit of {settings.max_batch_items}"
        )


def _prompt(item: Any, field: str) -> ChatPrompt | str:
    which = item.WhichOneof("prompt") if hasattr(item, "WhichOneof") else None
    if which == "chat":
        return ChatPrompt(
            tuple((m.role, m.content) for m in item.chat.messages), item.chat.continue_final_message
        )
    if which == "text":
        if not item.text:
            raise InvalidArgument(f"{field}.text", "empty prompt")
        return str(item.text)
    raise InvalidArgument(f"{field}.prompt", "set chat or text")


def engine_items(
    ctx: RequestContext,
    items: Sequence[pb.Item],
    request_steering: Sequence[pb.SteeringSpec],
    *,
    seed: int = 0,
    extra_tokens: int = 0,
    use_response: bool = True,
) -> list[EngineItem]:
    """Tokenise and validate items; ``extra_tokens`` reserves room for generated tokens."""
    _check_batch(len(items), ctx.settings)
    shared = ctx.steering(request_steering, "steering")
    limit = ctx.settings.max_tokens_per_item
    out: list[EngineItem] = []
    for i, item in enumerate(items):
        field = f"items[{i}]"
        prompt = _prompt(item, field)
        texts = [prompt] if isinstance(prompt, str) else [c for _r, c in prompt.messages]
        if use_response and item.HasField("response"):
            texts.append(item.response)
        # Before tokenizing: megabytes of text take seconds to tokenize only to be refused.
        guards.check_prompt_chars(ctx.engine, limit, texts, field)
        prompt_ids = ctx.engine.encode_prompt(prompt, field)
        response_ids: list[int] = []
        if use_response and item.HasField("response"):
            response_ids = ctx.engine.encode_text(item.response)
        total = len(prompt_ids) + len(response_ids) + extra_tokens
        if total > limit:
            raise InvalidArgument(field, f"{total} tokens exceed the limit of {limit} per item")
        if not prompt_ids:
            raise InvalidArgument(f"{field}.prompt", "the prompt encodes to no tokens")
        steering = shared + ctx.steering(item.steering, f"{field}.steering")
        _check_strength(ctx, shared, steering, field)
        item_seed = int(item.seed) if item.HasField("seed") else row_seed(seed, i)
        out.append(EngineItem(prompt_ids, response_ids, steering, item_seed))
    return out


def _check_strength(
    ctx: RequestContext, shared: Sequence[SteerSpec], steering: Sequence[SteerSpec], field: str
) -> None:
    """Coefficient x vector of every spec item ``field`` runs with, checked together."""
    named = [
        (f"steering[{k}]" if k < len(shared) else f"{field}.steering[{k - len(shared)}]", spec)
        for k, spec in enumerate(steering)
    ]
    dtype = getattr(ctx.engine, "dtype", torch.float32)
    guards.check_steering_strength(
        named, dtype if isinstance(dtype, torch.dtype) else torch.float32
    )


def gen_params(params: pb.GenerationParams, settings: LoaderSettings) -> GenParams:
    """Validate decoding settings."""
    max_new = params.max_new_tokens or 64
    if not 1 <= max_new <= settings.max_new_tokens:
        raise InvalidArgument(
            "params.max_new_tokens", f"must be within 1..{settings.max_new_tokens}"
        )
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgument("params.temperature", "must be a finite value >= 0")
    if not math.isfinite(params.top_p) or not 0 <= params.top_p <= 1:
        raise InvalidArgument("params.top_p", "must be within [0, 1]")
    if params.top_k < 0:
        raise InvalidArgument("params.top_k", "must be >= 0")
    if not 0 <= params.top_logprobs <= 20:
        raise InvalidArgument("params.top_logprobs", "must be within 0..20")
    for j, stop in enumerate(params.stop):
        if not stop:
            raise InvalidArgument(f"params.stop[{j}]", "empty stop string")
    return GenParams(
        max_new_tokens=max_new,
        temperature=float(params.temperature),
        top_p=float(params.top_p) if params.top_p > 0 else 1.0,
        top_k=int(params.top_k),
        stop=tuple(params.stop),
        logprobs=bool(params.logprobs or params.top_logprobs),
        top_logprobs=int(params.top_logprobs),
    )


def generation(result: GenResult) -> pb.Generation:
    out = pb.Generation(
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
    )
    for step in result.logprobs or []:
        tid, tok, lp = step.chosen
        out.logprobs.append(
            pb.StepLogprobs(
                chosen=pb.TokenLogprob(token_id=tid, token=tok, logprob=lp),
                top=[pb.TokenLogprob(token_id=t, token=s, logprob=v) for t, s, v in step.top],
            )
        )
    return out


def capture_layers(ctx: RequestContext, layers: Sequence[int], all_layers: bool) -> list[int]:
    """Resolve the capture layer selection."""
    n = ctx.engine.num_layers
    if all_layers:
        if layers:
            raise InvalidArgument("layers", "give layers or all_layers, not both")
        return list(range(n))
    if not layers:
        raise InvalidArgument("layers", "give at least one layer or set all_layers")
    return sorted({resolve_layer(layer, n, f"layers[{j}]") for j, layer in enumerate(layers)})


def capture_chunk(
    results: Sequence[CaptureResult], layers: Sequence[int], dtype: str
) -> pb.CaptureResponse:
    torch_dtype = getattr(torch, dtype)
    items = []
    for res in results:
        t = res.activations.to(torch_dtype).contiguous()
        items.append(
            pb.CapturedItem(
                index=res.index,
                activations=pb.Tensor(
                    dtype=dtype, shape=list(t.shape), data=t.view(torch.uint8).numpy().tobytes()
                ),
                num_positions=res.num_positions,
                prompt_tokens=res.prompt_tokens,
                response_tokens=res.response_tokens,
            )
        )
    return pb.CaptureResponse(layers=list(layers), items=items)


def score_inputs(ctx: RequestContext, request: pb.ScoreRequest) -> list[ScoreInput]:
    """Tokenise contexts and continuations."""
    _check_batch(len(request.items), ctx.settings)
    shared = ctx.steering(request.steering, "steering")
    limit = ctx.settings.max_tokens_per_item
    out: list[ScoreInput] = []
    for i, item in enumerate(request.items):
        field = f"items[{i}]"
        which = item.WhichOneof("context")
        if which == "chat":
            prompt: ChatPrompt | str = ChatPrompt(
                tuple((m.role, m.content) for m in item.chat.messages),
                item.chat.continue_final_message,
            )
        elif which == "text":
            prompt = str(item.text)
        else:
            raise InvalidArgument(f"{field}.context", "set chat or text")
        texts = [prompt] if isinstance(prompt, str) else [c for _r, c in prompt.messages]
        guards.check_prompt_chars(ctx.engine, limit, [*texts, *item.continuations], field)
        context_ids = (
            ctx.engine.encode_prompt(prompt, field) if (which == "chat" or item.text) else []
        )
        if not context_ids:
            raise InvalidArgument(f"{field}.context", "the context encodes to no tokens")
        if not item.continuations:
            raise InvalidArgument(f"{field}.continuations", "at least one continuation is required")
        conts: list[list[int]] = []
        for j, text in enumerate(item.continuations):
            ids = ctx.engine.encode_text(text)
            if not ids:
                raise InvalidArgument(
                    f"{field}.continuations[{j}]", "the continuation encodes to no tokens"
                )
            if len(context_ids) + len(ids) > limit:
                raise InvalidArgument(
                    f"{field}.continuations[{j}]",
                    f"{len(context_ids) + len(ids)} tokens exceed the limit of {limit} per item",
                )
            conts.append(ids)
        steering = shared + ctx.steering(item.steering, f"{field}.steering")
        _check_strength(ctx, shared, steering, field)
        out.append(ScoreInput(context_ids, conts, [len(t) for t in item.continuations], steering))
    return out


def score_result(scores: Sequence[ContinuationScore]) -> pb.ScoreResult:
    return pb.ScoreResult(
        continuations=[
            pb.ContinuationScore(
                logprob=s.logprob,
                num_tokens=s.num_tokens,
                num_chars=s.num_chars,
                is_greedy=s.is_greedy,
                token_logprobs=s.token_logprobs,
            )
            for s in scores
        ]
    )


def next_token_ids(ctx: RequestContext, request: pb.NextTokenRequest) -> tuple[int, list[int]]:
    """Validate top_k and the requested token ids/strings."""
    top_k = request.top_k if request.top_k else 10
    if not 0 <= top_k <= 1000:
        raise InvalidArgument("top_k", "must be within 0..1000")
    ids: list[int] = []
    vocab = ctx.engine.vocab_size
    for j, tid in enumerate(request.token_ids):
        if not 0 <= tid < vocab:
            raise InvalidArgument(
                f"token_ids[{j}]", f"id {tid} is outside the vocabulary (0..{vocab - 1})"
            )
        ids.append(int(tid))
    for j, text in enumerate(request.token_strings):
        ids.append(ctx.engine.single_token_id(text, f"token_strings[{j}]"))
    return top_k, ids


def next_token_result(result: NextTokenResult) -> pb.NextTokenResult:
    return pb.NextTokenResult(
        top=[pb.TokenLogprob(token_id=t, token=s, logprob=lp) for t, s, lp in result.top],
        stats=pb.LogitStats(**result.stats),
        requested_ids=result.requested_ids,
        requested_logits=result.requested_logits,
        requested_logprobs=result.requested_logprobs,
    )
