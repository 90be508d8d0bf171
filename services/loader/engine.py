"""The engine interface: what a loader serves, whatever runs the model.

An ``Engine`` loads one variant and serves the four computations of the loader API with
per-row steering: ``generate``, ``capture`` (residual stream after chosen layers, at a
position, with a reduction), ``score`` (log-likelihood of continuations) and ``next_token``
(the distribution after a prompt), plus ``health`` and a description for ``Info``. Its
``EngineCapabilities`` say what it computes exactly, so the gRPC server can refuse the rest
with a named error and the loader registry routes that work to another loader of the variant.
The server (``services.loader.server``) talks only to this interface; engines are chosen by
name in ``services.loader.backends.registry`` (the transformers engine is
``services.loader.engines.hf``).

Engines are synchronous and not thread-safe: the server runs one on a dedicated thread and
sets ``checkpoint`` for each unit of work; an engine calls it between micro-batches and decode
steps, and it raises when the caller is gone.

Request values reach an engine already validated (``services.loader.convert``); what depends
on the model (a capture position within each item, the model length, steering the engine
cannot do) is checked here, once, in the public methods every engine inherits, and the chat
template by the engine's ``Tokens``. ``describe`` assembles ``Info``'s facts from the same
attributes for every engine; an engine adds only its device, size, quantization and notes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from services.common.errors import InvalidArgument
from services.loader.capabilities import EngineCapabilities, Reduction
from services.loader.positions import Position
from services.loader.seeds import row_seed
from services.loader.steering import SteerSpec

if TYPE_CHECKING:
    from services.common.settings import LoaderSettings
    from services.common.variants import Precision
    from services.loader.engines.hf.tokens import Tokens
    from services.loader.model_source import ResolvedSource

__all__ = [
    "CaptureResult",
    "ChatPrompt",
    "ContinuationScore",
    "Engine",
    "EngineCapabilities",
    "EngineDescription",
    "EngineHealth",
    "EngineItem",
    "GenParams",
    "GenResult",
    "NextTokenResult",
    "PaddingSide",
    "Reduction",
    "ScoreInput",
    "StepLogprob",
    "row_seed",
]

PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages as (role, content) pairs."""

    messages: tuple[tuple[str, str], ...]
    continue_final_message: bool = False


@dataclass
class EngineItem:
    """A tokenised item: prompt ids, response ids (replay), row steering and row seed."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    steering: list[SteerSpec] = field(default_factory=list)
    seed: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class GenParams:
    """Decoding settings (validated by the caller)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # Benchmarks only: keep generating past end-of-turn so every row does equal work.
    ignore_eos: bool = False


@dataclass(frozen=True)
class StepLogprob:
    """Log-prob of the chosen token and of the top alternatives at one step."""

    chosen: tuple[int, str, float]
    top: tuple[tuple[int, str, float], ...]


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[StepLogprob] | None = None


@dataclass
class CaptureResult:
    index: int
    activations: torch.Tensor  # [L, H] or [L, T, H], CPU
    num_positions: int
    prompt_tokens: int
    response_tokens: int


@dataclass
class ScoreInput:
    context_ids: list[int]
    continuations: list[list[int]]
    continuation_chars: list[int]
    steering: list[SteerSpec] = field(default_factory=list)


@dataclass
class ContinuationScore:
    logprob: float
    num_tokens: int
    num_chars: int
    is_greedy: bool
    token_logprobs: list[float]


@dataclass
class NextTokenResult:
    top: list[tuple[int, str, float]]
    stats: dict[str, float]
    requested_ids: list[int]
    requested_logits: list[float]
    requested_logprobs: list[float]


@dataclass
class EngineDescription:
    """Load-time facts of an engine's model, as ``Info`` reports them."""

    num_layers: int
    hidden_size: int
    dtype: str  # of activations, e.g. "bfloat16"
    device: str  # e.g. "cpu", "cuda:0"
    parameter_bytes: int
    supports_chat_template: bool
    supports_system_role: bool
    vocab_size: int
    quantization_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EngineHealth:
    """Whether the engine can serve, and why not."""

    ok: bool
    detail: str = ""


class Engine(ABC):
    """One loaded variant behind the loader API; see the module docstring.

    The public computations check the request against ``capabilities`` and then call the
    engine's implementation (``_generate``, ``_capture``, ``_score``, ``_next_token``).
    """

    name: str = ""
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype  # of activations
    # The tokenizer with the model's chat template and end-of-turn ids.
    tokens: Tokens
    capabilities: EngineCapabilities
    # Tokens a row may hold, prompt and generation together (0: no limit of the engine's own).
    max_model_len: int = 0
    # Tokens run through the model so far (the server's throughput metrics).
    tokens_processed: int = 0
    # Raises when the current unit of work is no longer wanted (set by the server).
    checkpoint: Callable[[], None]

    @classmethod
    @abstractmethod
    def load(
        cls,
        source: ResolvedSource,
        precision: Precision,
        backend: str,
        *,
        device: str,
        settings: LoaderSettings,
    ) -> Engine:
        """Load ``source`` at ``precision`` on ``device``; ``backend`` is the registered
        backend name it is served under (``services.loader.backends.registry``)."""

    # ------------------------------------------------------------------ tokens
    def encode_prompt(self, prompt: ChatPrompt | str, field: str) -> list[int]:
        """Token ids of a prompt; chats get the chat template (and the generation prompt)."""
        return self.tokens.encode_prompt(prompt, field)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a continuation or response (no special tokens)."""
        return self.tokens.encode_text(text)

    def token_string(self, token_id: int) -> str:
        """The text of one token."""
        return self.tokens.token_string(token_id)

    def single_token_id(self, text: str, field: str) -> int:
        """The id of ``text``; InvalidArgument naming ``field`` unless it is exactly one token."""
        ids = self.encode_text(text)
        if len(ids) != 1:
            raise InvalidArgument(
                field, f"{text!r} encodes to {len(ids)} tokens, expected exactly 1"
            )
        return ids[0]

    # ------------------------------------------------------------------ computations
    def generate(
        self, items: Sequence[EngineItem], params: GenParams, *, max_rows: int = 0
    ) -> list[GenResult]:
        """Generate for every item (per-row seeds make samples batch-independent)."""
        self.capabilities.check_rpc("generate")
        self._check_steering(items)
        self._check_lengths([len(it.prompt_ids) for it in items], params.max_new_tokens)
        return self._generate(items, params, max_rows=max_rows)

    def capture(
        self,
        items: Sequence[EngineItem],
        layers: Sequence[int],
        position: Position,
        reduction: Reduction,
        *,
        padding_side: PaddingSide = "left",
        max_rows: int = 0,
        chunk_items: int = 64,
    ) -> Iterator[list[CaptureResult]]:
        """Residual stream after ``layers``: results in request order, ``chunk_items`` at a
        time (items are validated before the first chunk)."""
        self.capabilities.check_rpc("capture")
        self.capabilities.check_capture(position, reduction)
        self._check_steering(items)
        for i, item in enumerate(items):
            start, end = position.span(len(item.prompt_ids), len(item.response_ids))
            if end <= start or start < 0:
                where = "response" if position.needs_response else "prompt"
                raise InvalidArgument(
                    f"items[{i}].{where}", f"position {position} selects no tokens of this item"
                )
        self._check_lengths([it.length for it in items], 1)
        return self._capture(
            items,
            layers,
            position,
            reduction,
            padding_side=padding_side,
            max_rows=max_rows,
            chunk_items=chunk_items,
        )

    def score(
        self,
        items: Sequence[ScoreInput],
        *,
        token_logprobs: bool = False,
        padding_side: PaddingSide = "left",
        max_rows: int = 0,
    ) -> list[list[ContinuationScore]]:
        """Log-likelihood of each continuation after its context."""
        self.capabilities.check_rpc("score")
        self._check_steering(items)
        self._check_lengths(
            [len(it.context_ids) + max(map(len, it.continuations), default=0) for it in items], 1
        )
        return self._score(
            items, token_logprobs=token_logprobs, padding_side=padding_side, max_rows=max_rows
        )

    def next_token(
        self,
        items: Sequence[EngineItem],
        *,
        top_k: int,
        token_ids: Sequence[int],
        padding_side: PaddingSide = "left",
        max_rows: int = 0,
    ) -> list[NextTokenResult]:
        """Distribution over the token after each item's prompt (+ response)."""
        self.capabilities.check_rpc("next_token")
        self._check_steering(items)
        self._check_lengths([it.length for it in items], 1)
        return self._next_token(
            items, top_k=top_k, token_ids=token_ids, padding_side=padding_side, max_rows=max_rows
        )

    def _check_steering(self, items: Sequence[EngineItem | ScoreInput]) -> None:
        for i, item in enumerate(items):
            self.capabilities.check_steering(item.steering, f"items[{i}].steering")

    def _check_lengths(self, lengths: Sequence[int], extra: int) -> None:
        """InvalidArgument naming the first item whose tokens plus ``extra`` (the generation,
        or the one token a forward-only request decodes) pass ``max_model_len``."""
        if self.max_model_len <= 0:
            return
        for i, n in enumerate(lengths):
            if n + extra > self.max_model_len:
                raise InvalidArgument(
                    f"items[{i}]",
                    f"{n} tokens plus {extra} generated exceed the model length "
                    f"{self.max_model_len} of this loader",
                )

    @abstractmethod
    def _generate(
        self, items: Sequence[EngineItem], params: GenParams, *, max_rows: int
    ) -> list[GenResult]: ...

    @abstractmethod
    def _capture(
        self,
        items: Sequence[EngineItem],
        layers: Sequence[int],
        position: Position,
        reduction: Reduction,
        *,
        padding_side: PaddingSide,
        max_rows: int,
        chunk_items: int,
    ) -> Iterator[list[CaptureResult]]: ...

    @abstractmethod
    def _score(
        self,
        items: Sequence[ScoreInput],
        *,
        token_logprobs: bool,
        padding_side: PaddingSide,
        max_rows: int,
    ) -> list[list[ContinuationScore]]: ...

    @abstractmethod
    def _next_token(
        self,
        items: Sequence[EngineItem],
        *,
        top_k: int,
        token_ids: Sequence[int],
        padding_side: PaddingSide,
        max_rows: int,
    ) -> list[NextTokenResult]: ...

    # ------------------------------------------------------------------ state
    @abstractmethod
    def health(self) -> EngineHealth:
        """Whether the engine can serve now (cheap: called by probes)."""

    def describe(self) -> EngineDescription:
        """Load-time facts for ``Info``: the geometry and tokenizer facts every engine has,
        and the engine's own device, size, quantization and notes."""
        return EngineDescription(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=self.device_label(),
            parameter_bytes=self.parameter_bytes(),
            supports_chat_template=self.tokens.has_chat_template,
            supports_system_role=self.tokens.has_system_role,
            vocab_size=self.vocab_size,
            quantization_config=self.quantization_config(),
            notes=self.load_notes(),
        )

    @abstractmethod
    def device_label(self) -> str:
        """Where the model runs, e.g. "cpu", "cuda:0"."""

    @abstractmethod
    def parameter_bytes(self) -> int:
        """Bytes of the loaded weights."""

    def quantization_config(self) -> dict[str, Any]:
        """The checkpoint's quantization settings as ``Info`` reports them; none here."""
        return {}

    def load_notes(self) -> list[str]:
        """Notes for ``Info`` (how the engine serves this model); ``live_notes`` here."""
        return self.live_notes()

    def live_notes(self) -> list[str]:
        """Notes that may appear while serving (e.g. a fast path switched off); none here."""
        return []

    def counters(self) -> dict[str, int]:
        """Monotonic event counts for the server's metrics: ``oom_retries``,
        ``graphs_recorded``, ``graph_replays`` (engines without them report 0)."""
        return {"oom_retries": 0, "graphs_recorded": 0, "graph_replays": 0}

    def free_memory(self) -> None:  # noqa: B027 - optional hook
        """Release cached accelerator memory (after an out-of-memory error)."""
