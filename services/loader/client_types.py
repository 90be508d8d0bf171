"""The loader client's values: requests (chats, steering, prompt and score items) and
results (info, generations, captures, continuation scores, next tokens), with their protos."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.common.tensor_codec import encode
from services.loader.capabilities import EngineCapabilities
from services.loader.pb import loader_pb2 as pb

__all__ = [
    "CaptureOutput",
    "Chat",
    "ContinuationScore",
    "Generation",
    "LoaderInfo",
    "NextToken",
    "PromptItem",
    "ScoreItem",
    "Steer",
]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Chat:
    """Chat messages; ``continue_final`` leaves a final assistant message open."""

    messages: Sequence[tuple[str, str]]
    continue_final: bool = False

    @classmethod
    def of(
        cls,
        messages: Sequence[Mapping[str, str]] | Sequence[tuple[str, str]],
        continue_final: bool = False,
    ) -> Chat:
        pairs = [
            (m["role"], m["content"]) if isinstance(m, Mapping) else (m[0], m[1]) for m in messages
        ]
        return cls(tuple(pairs), continue_final)


@dataclass(frozen=True)
class Steer:
    """One steering spec: a vector (or an index into the request's vector table) at layers."""

    layers: Sequence[int]
    coefficient: float
    vector: np.ndarray | None = None
    vector_ref: int | None = None
    mode: Literal["add", "ablate"] = "add"
    positions: Literal["prompt", "response", "all"] = "all"

    def to_proto(self) -> pb.SteeringSpec:
        spec = pb.SteeringSpec(
            layers=list(self.layers),
            coefficient=float(self.coefficient),
            mode=pb.STEERING_MODE_ADD if self.mode == "add" else pb.STEERING_MODE_ABLATE,
            positions={
                "prompt": pb.STEERING_POSITIONS_PROMPT,
                "response": pb.STEERING_POSITIONS_RESPONSE,
                "all": pb.STEERING_POSITIONS_ALL,
            }[self.positions],
        )
        if self.vector is not None:
            spec.vector.CopyFrom(_tensor(self.vector))
        elif self.vector_ref is not None:
            spec.vector_ref = int(self.vector_ref)
        return spec


@dataclass(frozen=True)
class PromptItem:
    """A prompt (chat or raw text), an optional response to replay, row steering and seed."""

    prompt: Chat | str
    response: str | None = None
    steering: Sequence[Steer] = ()
    seed: int | None = None

    def to_proto(self) -> pb.Item:
        item = pb.Item()
        if isinstance(self.prompt, Chat):
            item.chat.CopyFrom(_conversation(self.prompt))
        else:
            item.text = self.prompt
        if self.response is not None:
            item.response = self.response
        item.steering.extend(s.to_proto() for s in self.steering)
        if self.seed is not None:
            item.seed = int(self.seed) & 0xFFFFFFFFFFFFFFFF
        return item


@dataclass(frozen=True)
class ScoreItem:
    """A context and the continuations to score after it."""

    context: Chat | str
    continuations: Sequence[str]
    steering: Sequence[Steer] = ()

    def to_proto(self) -> pb.ScoreItem:
        item = pb.ScoreItem(continuations=list(self.continuations))
        if isinstance(self.context, Chat):
            item.chat.CopyFrom(_conversation(self.context))
        else:
            item.text = self.context
        item.steering.extend(s.to_proto() for s in self.steering)
        return item


@dataclass
class LoaderInfo:
    model: str
    precision: str
    backend: str
    variant: str
    num_layers: int
    hidden_size: int
    dtype: str
    device: str
    parameter_bytes: int
    supports_chat_template: bool
    supports_system_role: bool
    quantization_config: dict[str, Any]
    vocab_size: int
    max_tokens_per_item: int
    max_batch_items: int
    source: str
    notes: list[str]
    # The engine ("hf", ...) and what it computes exactly (None from a loader that predates
    # engine capabilities).
    engine: str = ""
    capabilities: EngineCapabilities | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CaptureOutput:
    """Captured activations: ``activations[i]`` is [L, H] (mean/last) or [L, T_i, H] (none)."""

    layers: list[int]
    activations: list[np.ndarray]
    num_positions: list[int]
    prompt_tokens: list[int]
    response_tokens: list[int]

    def stacked(self) -> np.ndarray:
        """[N, L, H] for mean/last reductions."""
        return np.stack(self.activations)


@dataclass
class ContinuationScore:
    logprob: float
    num_tokens: int
    num_chars: int
    is_greedy: bool
    token_logprobs: list[float]


@dataclass
class NextToken:
    top: list[tuple[int, str, float]]
    stats: dict[str, float]
    requested_ids: list[int]
    requested_logits: list[float]
    requested_logprobs: list[float]


def _tensor(value: np.ndarray) -> pb.Tensor:
    wire = encode(np.asarray(value, dtype=np.float32))
    return pb.Tensor(dtype=wire.dtype, shape=list(wire.shape), data=wire.data)


def _conversation(chat: Chat) -> pb.Conversation:
    return pb.Conversation(
        messages=[pb.Message(role=r, content=c) for r, c in chat.messages],
        continue_final_message=chat.continue_final,
    )
