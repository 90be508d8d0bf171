"""The model engine: tokenising, padding-correct micro-batching, and the four computations
(generate, capture, score, next token) with per-row steering.

It is synchronous and not thread-safe: the server runs it on one dedicated thread and sets
``checkpoint`` for each unit of work; it is called before every micro-batch and decode step
and raises when the caller is gone, so abandoned work stops promptly. Items are
sorted by length into micro-batches bounded by rows and padded tokens; an out-of-memory error
halves the micro-batch and retries (and lowers the row limit for later calls). Position ids
are computed from the attention mask, so left and right padding give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.logging import get_logger
from services.common.settings import LoaderSettings
from services.loader.backends.base import LoadedModel
from services.loader.capture_graphs import CaptureGraphs, pad_arrays
from services.loader.fastgen import FastGenerator, unsupported_reason
from services.loader.hooks import (
    CaptureSink,
    ForwardState,
    capture_forward,
    find_decoder_layers,
    install_hooks,
    reduction_inputs,
)
from services.loader.positions import Position
from services.loader.seeds import row_seed
from services.loader.steering import (
    SteeringPlan,
    SteerSpec,
    build_plan,
    first_prompt_layer,
    select_rows,
)
from services.loader.transfer import is_oom, to_device, to_host

__all__ = [
    "CaptureResult",
    "ChatPrompt",
    "ContinuationScore",
    "Engine",
    "EngineItem",
    "GenParams",
    "GenResult",
    "NextTokenResult",
    "ScoreInput",
    "StepLogprob",
    "row_seed",
]

log = get_logger(__name__)
R = TypeVar("R")
PaddingSide = Literal["left", "right"]
_M32 = 0xFFFFFFFF


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
class _Padded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    offsets: list[int]


def _no_checkpoint() -> None:
    return None


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer mixer on int64 tensors (products stay below 2**63).
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


class Engine:
    """Runs one loaded model; see the module docstring."""

    def __init__(self, loaded: LoadedModel, settings: LoaderSettings) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.config = text_config
        self.num_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.layers = find_decoder_layers(self.model, self.num_layers)
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.device = loaded.device
        self.dtype = loaded.compute_dtype
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.pad_id = int(
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        self.eos_ids = self._eos_ids()
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.has_system_role = self._probe_system_role()
        self.max_batch_size = settings.max_batch_size
        self.cache_mode = settings.generation_cache
        self.pinned_results = True
        on_gpu = self.device.type == "cuda"
        max_graphs = settings.capture_graphs
        if max_graphs is None:
            max_graphs = 8 if on_gpu else 0
        # Generation (cache_mode "auto") and capture through fastgen's layer loop where the
        # architecture allows.
        int8 = bool(loaded.quantization_config.get("load_in_8bit"))
        self.fast_disabled = (
            "LLM.int8()" if int8 else unsupported_reason(self.model, text_config, self.layers)
        )
        self.fast: FastGenerator | None = None
        if self.fast_disabled is None:
            plain_or_nf4 = not loaded.quantization_config or bool(
                loaded.quantization_config.get("load_in_4bit")
            )
            self.fast = FastGenerator(
                self.model,
                self.layers,
                text_config,
                device=self.device,
                dtype=self.dtype,
                pad_id=self.pad_id,
                logits=self._logits,
                use_graphs=on_gpu and settings.decode_graphs,
                static=on_gpu,
                # GPTQ/AWQ kernels are not checked under graph capture (bench/gpu_check.py).
                graphs_disabled=None if plain_or_nf4 else "quantized kernels not graph-checked",
            )
        self.graphs = CaptureGraphs(
            self.base,
            self.layers,
            device=self.device,
            dtype=self.dtype,
            pad_id=self.pad_id,
            attn_implementation=str(getattr(config, "_attn_implementation", None)),
            max_graphs=max_graphs,
            max_tokens=settings.capture_graph_tokens,
            fuse_bytes=self._capture_fuse_bytes,
            use_graphs=on_gpu,
            # LLM.int8()'s outlier decomposition depends on the data: never frozen in a graph.
            disabled="LLM.int8() (data-dependent outlier columns)"
            if loaded.quantization_config.get("load_in_8bit")
            else None,
            forward=None if self.fast is None else self.fast.capture_forward,
        )
        # Capture batches past this many padded tokens are cut where padding would pass 1/16
        # (compute-bound there: padded tokens are computed tokens); 0: never.
        self.capture_split_tokens = 8192
        self.oom_retries = 0
        self.forward_rows = 0
        self.tokens_processed = 0
        # Raises when the current unit of work is no longer wanted (set by the server).
        self.checkpoint: Callable[[], None] = _no_checkpoint

    # ------------------------------------------------------------------ tokenising
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    def _probe_system_role(self) -> bool:
        if not self.has_chat_template:
            return False
        try:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": "QSENS-SYS"}, {"role": "user", "content": "hi"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:
            return False
        return "QSENS-SYS" in str(rendered)

    def encode_prompt(self, prompt: ChatPrompt | str, field: str) -> list[int]:
        """Token ids of a prompt; chats get the chat template (and the generation prompt)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not self.has_chat_template:
            raise InvalidArgument(f"{field}.chat", "this model has no chat template; send text")
        if not prompt.messages:
            raise InvalidArgument(f"{field}.chat.messages", "at least one message is required")
        for j, (role, _content) in enumerate(prompt.messages):
            if role not in ("system", "user", "assistant"):
                raise InvalidArgument(
                    f"{field}.chat.messages[{j}].role",
                    f"unknown role {role!r} (system, user, assistant)",
                )
            if role == "system" and not self.has_system_role:
                raise InvalidArgument(
                    f"{field}.chat.messages[{j}].role",
                    "this model's chat template has no system role",
                )
        if prompt.continue_final_message and prompt.messages[-1][0] != "assistant":
            raise InvalidArgument(
                f"{field}.chat.continue_final_message",
                "the last message must be from the assistant",
            )
        messages = [{"role": r, "content": c} for r, c in prompt.messages]
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not prompt.continue_final_message,
            continue_final_message=prompt.continue_final_message,
        )
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a continuation or response (no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_string(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def single_token_id(self, text: str, field: str) -> int:
        ids = self.encode_text(text)
        if len(ids) != 1:
            raise InvalidArgument(
                field, f"{text!r} encodes to {len(ids)} tokens, expected exactly 1"
            )
        return ids[0]

    # ------------------------------------------------------------------ batching
    def _micro_batches(
        self, lengths: Sequence[int], extra: int, max_rows: int, split_tokens: int = 0
    ) -> list[list[int]]:
        """Rows sorted longest first, split greedily by rows and padded tokens; with
        ``split_tokens``, a batch that holds that many padded tokens also ends where the next
        row would pad it by more than 1/16."""
        sizes = np.asarray(lengths, dtype=np.int64)
        limit_rows = max(1, min(max_rows or self.max_batch_size, self.max_batch_size))
        # Stable: equal lengths keep request order (results must not depend on ties).
        order = np.argsort(-sizes, kind="stable").tolist()
        padded = (int(sizes.max()) + extra) * len(order) if order else 0
        fits = len(order) <= limit_rows and padded <= self.settings.max_batch_tokens
        if fits and (not split_tokens or padded <= split_tokens):
            return [order] if order else []
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            size = lengths[i] + extra
            grown = max(longest, size)
            wasteful = (
                split_tokens > 0
                and longest * len(current) >= split_tokens
                and size * 16 < longest * 15
            )
            if current and (
                len(current) + 1 > limit_rows
                or grown * (len(current) + 1) > self.settings.max_batch_tokens
                or wasteful
            ):
                batches.append(current)
                current, grown = [], size
            current.append(i)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def _adaptive(self, rows: list[int], fn: Callable[[list[int]], list[R]]) -> list[R]:
        """Run ``fn`` on ``rows``; on OOM free memory, halve and retry each half."""
        self.checkpoint()
        try:
            fault = self.settings.fault_oom_above_batch
            if fault and len(rows) > fault:
                raise torch.OutOfMemoryError(f"injected OOM for {len(rows)} rows > {fault}")
            return fn(rows)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._free_memory()
            if len(rows) == 1:
                raise ResourceExhausted("out of memory on a single item; shorten it") from exc
            self.oom_retries += 1
            half = len(rows) // 2
            self.max_batch_size = max(1, min(self.max_batch_size, half))
            log.warning("out of memory; halving the batch", extra={"rows": len(rows), "now": half})
            return self._adaptive(rows[:half], fn) + self._adaptive(rows[half:], fn)

    def _free_memory(self) -> None:
        self.graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _pad(self, seqs: Sequence[tuple[list[int], int]], side: PaddingSide) -> _Padded:
        """Pad (ids, prompt_len) rows; prompt/response masks exclude padding (``pad_arrays``)."""
        input_ids, positions, starts, attention, prompt, response = pad_arrays(
            seqs, side, self.pad_id
        )
        # Two host-to-device copies instead of five (each is a host-side wait on a GPU).
        ints = to_device(torch.from_numpy(np.stack([input_ids, attention, positions])), self.device)
        masks = to_device(torch.from_numpy(np.stack([prompt, response])), self.device)
        return _Padded(ints[0], ints[1], ints[2], masks[0], masks[1], [int(x) for x in starts])

    def _plan(self, steering: Sequence[Sequence[SteerSpec]]) -> SteeringPlan:
        return build_plan(
            steering, hidden_size=self.hidden_size, device=self.device, dtype=self.dtype
        )

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _count(self, rows: int, tokens: int) -> None:
        self.forward_rows += rows
        self.tokens_processed += tokens

    # ------------------------------------------------------------------ capture
    def capture(
        self,
        items: Sequence[EngineItem],
        layers: Sequence[int],
        position: Position,
        reduction: Literal["mean", "last", "none"],
        *,
        padding_side: PaddingSide = "left",
        max_rows: int = 0,
        chunk_items: int = 64,
    ) -> Iterator[list[CaptureResult]]:
        """Yield results in request order, ``chunk_items`` at a time (validated up front)."""
        for i, item in enumerate(items):
            start, end = position.span(len(item.prompt_ids), len(item.response_ids))
            if end <= start or start < 0:
                where = "response" if position.needs_response else "prompt"
                raise InvalidArgument(
                    f"items[{i}].{where}", f"position {position} selects no tokens of this item"
                )
        layer_list = sorted(set(layers))
        chunk = max(1, chunk_items)
        for window_start in range(0, len(items), chunk):
            window = list(range(window_start, min(len(items), window_start + chunk)))
            results: dict[int, CaptureResult] = {}
            lengths = [items[i].length for i in window]
            for batch in self._micro_batches(lengths, 0, max_rows, self.capture_split_tokens):
                rows = [window[j] for j in batch]

                def run(sub: list[int]) -> list[CaptureResult]:
                    return self._capture_batch(
                        [items[i] for i in sub], sub, layer_list, position, reduction, padding_side
                    )

                for res in self._adaptive(rows, run):
                    results[res.index] = res
            yield [results[i] for i in window]

    @torch.inference_mode()
    def _capture_batch(
        self,
        batch: Sequence[EngineItem],
        indices: Sequence[int],
        layers: list[int],
        position: Position,
        reduction: Literal["mean", "last", "none"],
        side: PaddingSide,
    ) -> list[CaptureResult]:
        seqs = [(it.prompt_ids + it.response_ids, len(it.prompt_ids)) for it in batch]
        # Spans relative to each row's first token; built on the host and copied once:
        # per-row slice assignments on a GPU tensor would each be a kernel launch.
        spans = np.array(
            [position.span(len(it.prompt_ids), len(it.response_ids)) for it in batch],
            dtype=np.int64,
        ).reshape(len(batch), 2)
        counts = spans[:, 1] - spans[:, 0]  # spans lie within their item
        plan = self._plan([it.steering for it in batch])
        graph_key = (
            self.graphs.key(len(batch), max(it.length for it in batch), layers, reduction)
            if plan.empty
            else None
        )
        result: torch.Tensor | None = None
        if graph_key is not None:
            result = self.graphs.run(graph_key, seqs, spans, side)
        if result is None:
            result = self._capture_eager(seqs, spans, plan, layers, reduction, side)
        self._count(len(batch), sum(it.length for it in batch))
        out: list[CaptureResult] = []
        stacked = to_host(result, pinned=self.pinned_results)
        if reduction == "none":
            per_row = torch.split(stacked, [int(c) for c in counts])  # [N, L, H] -> rows
            for b, item in enumerate(batch):
                acts = per_row[b].transpose(0, 1)  # [L, n_b, H]
                out.append(
                    CaptureResult(
                        indices[b],
                        acts,
                        int(counts[b]),
                        len(item.prompt_ids),
                        len(item.response_ids),
                    )
                )
        else:  # stacked: [B, L, H]
            for b, item in enumerate(batch):
                out.append(
                    CaptureResult(
                        indices[b],
                        stacked[b],
                        int(counts[b]),
                        len(item.prompt_ids),
                        len(item.response_ids),
                    )
                )
        return out

    def _capture_eager(
        self,
        seqs: list[tuple[list[int], int]],
        spans: np.ndarray,
        plan: SteeringPlan,
        layers: list[int],
        reduction: Literal["mean", "last", "none"],
        side: PaddingSide,
    ) -> torch.Tensor:
        """The hooked forward of one micro-batch: [B, L, H] (mean, last) or [N, L, H] (none)."""
        padded = self._pad(seqs, side)
        spans = spans + np.asarray(padded.offsets, dtype=np.int64)[:, None]
        col = np.arange(padded.input_ids.shape[1], dtype=np.int64)[None, :]
        select = torch.from_numpy((col >= spans[:, :1]) & (col < spans[:, 1:]))
        sink = CaptureSink(
            frozenset(layers),
            reduction,
            reduction_inputs(select, reduction).to(self.device),
            stop_after=layers[-1],
            fuse_bytes=self._capture_fuse_bytes(),
        )
        state = ForwardState(padded.prompt_mask, padded.response_mask, plan, sink)
        if self.fast is not None:
            return self.fast.capture_forward(
                padded.input_ids, padded.attention_mask.bool(), padded.position_ids, state
            )
        return capture_forward(
            self.base,
            self.layers,
            state,
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            position_ids=padded.position_ids,
        )

    def _capture_fuse_bytes(self) -> int:
        configured = self.settings.capture_fuse_bytes
        if configured is not None:
            return configured
        # A CPU is not bound by kernel launches: there the stack copy would only cost.
        return 64 * 2**20 if self.device.type == "cuda" else 0

    # ------------------------------------------------------------------ next token
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
        results: dict[int, NextTokenResult] = {}
        for batch in self._micro_batches([it.length for it in items], 0, max_rows):

            def run(sub: list[int]) -> list[tuple[int, NextTokenResult]]:
                return self._next_token_batch(items, sub, top_k, token_ids, padding_side)

            for index, res in self._adaptive(batch, run):
                results[index] = res
        return [results[i] for i in range(len(items))]

    @torch.inference_mode()
    def _next_token_batch(
        self,
        items: Sequence[EngineItem],
        rows: list[int],
        top_k: int,
        token_ids: Sequence[int],
        side: PaddingSide,
    ) -> list[tuple[int, NextTokenResult]]:
        batch = [items[i] for i in rows]
        padded = self._pad(
            [(it.prompt_ids + it.response_ids, len(it.prompt_ids)) for it in batch], side
        )
        state = ForwardState(
            padded.prompt_mask, padded.response_mask, self._plan([it.steering for it in batch])
        )
        with install_hooks(self.layers, state):
            hidden = self.base(
                input_ids=padded.input_ids,
                attention_mask=padded.attention_mask,
                position_ids=padded.position_ids,
                use_cache=False,
            ).last_hidden_state
        self._count(len(batch), sum(it.length for it in batch))
        last = torch.tensor(
            [padded.offsets[b] + batch[b].length - 1 for b in range(len(batch))], device=self.device
        )
        logits = self._logits(hidden[torch.arange(len(batch), device=self.device), last])
        return [
            (rows[b], self._distribution(logits[b], top_k, token_ids)) for b in range(len(batch))
        ]

    def _distribution(
        self, logits: torch.Tensor, top_k: int, token_ids: Sequence[int]
    ) -> NextTokenResult:
        logprobs = torch.log_softmax(logits, dim=-1)
        probs = logprobs.exp()
        entropy = float(-(probs * logprobs).nan_to_num(0.0).sum())
        k = min(top_k, logits.numel())
        top_lp, top_ids = torch.topk(logprobs, k) if k > 0 else (logprobs[:0], logprobs[:0].long())
        sorted_p = torch.sort(probs.double()).values
        n = sorted_p.numel()
        ranks = torch.arange(1, n + 1, dtype=torch.float64, device=sorted_p.device)
        gini = float((2.0 * (ranks * sorted_p).sum()) / (n * sorted_p.sum()) - (n + 1) / n)
        stats = {
            "entropy": entropy,
            "logit_max": float(logits.max()),
            "logit_min": float(logits.min()),
            "logit_mean": float(logits.mean()),
            "logit_std": float(logits.std()),
            "gini": gini,
        }
        requested = list(token_ids)
        index = torch.tensor(requested, dtype=torch.long, device=logits.device)
        return NextTokenResult(
            top=[
                (int(t), self.token_string(int(t)), float(lp))
                for t, lp in zip(top_ids.tolist(), top_lp.tolist(), strict=True)
            ],
            stats=stats,
            requested_ids=requested,
            requested_logits=logits.index_select(0, index).tolist() if requested else [],
            requested_logprobs=logprobs.index_select(0, index).tolist() if requested else [],
        )

    # ------------------------------------------------------------------ score
    def score(
        self,
        items: Sequence[ScoreInput],
        *,
        token_logprobs: bool = False,
        padding_side: PaddingSide = "left",
        max_rows: int = 0,
    ) -> list[list[ContinuationScore]]:
        """Log-likelihood of each continuation; each context is run once and its cache shared."""
        cost = [
            len(it.context_ids) + max(len(c) for c in it.continuations) * len(it.continuations)
            for it in items
        ]
        results: dict[int, list[ContinuationScore]] = {}
        for batch in self._micro_batches(cost, 0, max_rows):

            def run(sub: list[int]) -> list[tuple[int, list[ContinuationScore]]]:
                return self._score_batch(items, sub, token_logprobs, padding_side)

            for index, res in self._adaptive(batch, run):
                results[index] = res
        return [results[i] for i in range(len(items))]

    @torch.inference_mode()
    def _score_batch(
        self,
        items: Sequence[ScoreInput],
        rows: list[int],
        keep_tokens: bool,
        side: PaddingSide,
    ) -> list[tuple[int, list[ContinuationScore]]]:
        from transformers import DynamicCache

        batch = [items[i] for i in rows]
        dev = self.device
        ctx = self._pad([(it.context_ids, len(it.context_ids)) for it in batch], side)
        plan = self._plan([it.steering for it in batch])
        cache = DynamicCache(config=self.model.config)
        state = ForwardState(ctx.prompt_mask, ctx.response_mask, plan)
        with install_hooks(self.layers, state):
            hidden = self.base(
                input_ids=ctx.input_ids,
                attention_mask=ctx.attention_mask,
                position_ids=ctx.position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            last = torch.tensor(
                [ctx.offsets[b] + len(batch[b].context_ids) - 1 for b in range(len(batch))],
                device=dev,
            )
            first_logprobs = torch.log_softmax(
                self._logits(hidden[torch.arange(len(batch), device=dev), last]), -1
            )
            owner = [b for b, it in enumerate(batch) for _ in it.continuations]
            conts = [c for it in batch for c in it.continuations]
            owner_t = torch.tensor(owner, device=dev)
            cache.batch_select_indices(owner_t)
            width = max(len(c) for c in conts)
            cont_ids = torch.full((len(conts), width), self.pad_id, dtype=torch.long)
            cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
            for n, c in enumerate(conts):
                cont_ids[n, : len(c)] = torch.tensor(c)
                cont_mask[n, : len(c)] = 1
            cont_ids, cont_mask = cont_ids.to(dev), cont_mask.to(dev)
            ctx_len = torch.tensor([len(batch[b].context_ids) for b in owner], device=dev)
            positions = ctx_len[:, None] + torch.arange(width, device=dev)[None, :]
            attention = torch.cat([ctx.attention_mask.index_select(0, owner_t), cont_mask], dim=1)
            state.plan = select_rows(plan, owner_t)
            state.prompt = torch.zeros_like(cont_mask, dtype=torch.bool)
            state.response = cont_mask.bool()
            cont_hidden = self.base(
                input_ids=cont_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        self._count(
            len(batch),
            sum(len(it.context_ids) for it in batch) + sum(len(c) for c in conts),
        )
        # Position j of a continuation predicts its token j+1; token 0 comes from the context.
        sel_rows, sel_cols, targets = [], [], []
        for n, c in enumerate(conts):
            for j in range(len(c) - 1):
                sel_rows.append(n)
                sel_cols.append(j)
                targets.append(c[j + 1])
        per_token: list[list[float]] = [[] for _ in conts]
        greedy: list[bool] = [True for _ in conts]
        firsts = first_logprobs.index_select(0, owner_t)
        first_targets = torch.tensor([c[0] for c in conts], device=dev)
        first_lp = firsts.gather(1, first_targets[:, None]).squeeze(1).tolist()
        first_greedy = (firsts.argmax(-1) == first_targets).tolist()
        for n in range(len(conts)):
            per_token[n].append(first_lp[n])
            greedy[n] = bool(first_greedy[n])
        if sel_rows:
            gathered = cont_hidden[
                torch.tensor(sel_rows, device=dev), torch.tensor(sel_cols, device=dev)
            ]
            lp_all = torch.log_softmax(self._logits(gathered), -1)
            tgt = torch.tensor(targets, device=dev)
            lps = lp_all.gather(1, tgt[:, None]).squeeze(1).tolist()
            hits = (lp_all.argmax(-1) == tgt).tolist()
            for k, n in enumerate(sel_rows):
                per_token[n].append(lps[k])
                greedy[n] = greedy[n] and bool(hits[k])
        out: list[tuple[int, list[ContinuationScore]]] = []
        n = 0
        for b, item in enumerate(batch):
            scores: list[ContinuationScore] = []
            for c_index, cont in enumerate(item.continuations):
                scores.append(
                    ContinuationScore(
                        logprob=float(math.fsum(per_token[n])),
                        num_tokens=len(cont),
                        num_chars=item.continuation_chars[c_index],
                        is_greedy=greedy[n],
                        token_logprobs=per_token[n] if keep_tokens else [],
                    )
                )
                n += 1
            out.append((rows[b], scores))
        return out

    # ------------------------------------------------------------------ generate
    def generate(
        self, items: Sequence[EngineItem], params: GenParams, *, max_rows: int = 0
    ) -> list[GenResult]:
        """Generate for every item (left padding; per-row seeds make samples batch-independent)."""
        results: dict[int, GenResult] = {}
        for batch in self._micro_batches(
            [len(it.prompt_ids) for it in items], params.max_new_tokens, max_rows
        ):

            def run(sub: list[int]) -> list[tuple[int, GenResult]]:
                if self.fast is not None and self.cache_mode == "auto":
                    return self._generate_fast(items, sub, params)
                return self._generate_batch(items, sub, params)

            for index, res in self._adaptive(batch, run):
                results[index] = res
        return [results[i] for i in range(len(items))]

    def _sample(
        self, logits: torch.Tensor, params: GenParams, keys: torch.Tensor, step: int
    ) -> torch.Tensor:
        if params.temperature <= 0.0:
            return logits.argmax(dim=-1)
        scaled = logits / params.temperature
        if params.top_k > 0 and params.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if 0.0 < params.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True, dim=-1)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
        # Gumbel-max with counter-based uniforms: a row's sample depends only on its seed and
        # the step, never on the other rows of the batch.
        vocab = torch.arange(scaled.shape[-1], device=scaled.device, dtype=torch.int64)
        step_keys = _hash32((keys + step * 0x9E3779B1) & _M32)
        bits = _hash32(_hash32(step_keys[:, None] ^ vocab[None, :]) ^ 0x27D4EB2F)
        uniform = (bits.double() + 0.5) / 4294967296.0
        gumbel = -torch.log(-torch.log(uniform)).float()
        return (scaled + gumbel).argmax(dim=-1)

    @torch.inference_mode()
    def _generate_batch(
        self, items: Sequence[EngineItem], rows: list[int], params: GenParams
    ) -> list[tuple[int, GenResult]]:
        from transformers import DynamicCache, StaticCache

        batch = [items[i] for i in rows]
        dev = self.device
        count = len(batch)
        padded = self._pad([(it.prompt_ids, len(it.prompt_ids)) for it in batch], "left")
        width = padded.input_ids.shape[1]
        # A static cache writes in place (no per-step concatenation of the whole cache, which
        # dominates small models on GPUs); a dynamic cache lets finished rows leave the batch,
        # which pays off when compute, not launches, is the bottleneck (CPUs).
        static = self.cache_mode == "static" or (self.cache_mode == "auto" and dev.type == "cuda")
        cache: Any = (
            StaticCache(config=self.model.config, max_cache_len=width + params.max_new_tokens)
            if static
            else DynamicCache(config=self.model.config)
        )
        plan = self._plan([it.steering for it in batch])
        state = ForwardState(padded.prompt_mask, padded.response_mask, plan)
        keys = torch.tensor([it.seed & _M32 for it in batch], dtype=torch.int64, device=dev)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=dev)
        generated: list[list[int]] = [[] for _ in range(count)]
        step_logprobs: list[list[StepLogprob]] = [[] for _ in range(count)]
        finish = ["length"] * count
        active = torch.arange(count, device=dev)  # original row of each live cache row
        finished = [False] * count
        if static:
            attention = torch.zeros(
                (count, width + params.max_new_tokens), dtype=torch.long, device=dev
            )
            attention[:, :width] = padded.attention_mask
        else:
            attention = padded.attention_mask
        length = width
        next_pos = padded.position_ids[:, -1] + 1
        stop_window = max((len(s) for s in params.stop), default=0) + 8
        tokens_in = sum(len(it.prompt_ids) for it in batch)
        with install_hooks(self.layers, state):
            out = self.model(
                input_ids=padded.input_ids,
                attention_mask=attention[:, :length],
                position_ids=padded.position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :].float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            for step in range(params.max_new_tokens):
                self.checkpoint()
                tokens = self._sample(logits, params, keys, step)
                if params.logprobs:
                    self._record_logprobs(
                        logits, tokens, active, params.top_logprobs, step_logprobs, finished
                    )
                token_list = tokens.tolist()
                active_list = active.tolist()
                hit_eos = torch.isin(tokens, eos).tolist() if not params.ignore_eos else None
                for j, row in enumerate(active_list):
                    if finished[row]:
                        continue
                    generated[row].append(int(token_list[j]))
                    if hit_eos is not None and hit_eos[j]:
                        finish[row] = "stop"
                        finished[row] = True
                    elif params.stop:
                        tail = self.tokenizer.decode(generated[row][-stop_window:])
                        if any(s in tail for s in params.stop):
                            finish[row] = "stop"
                            finished[row] = True
                keep = [j for j, row in enumerate(active_list) if not finished[row]]
                if not keep or step + 1 == params.max_new_tokens:
                    break
                if not static and len(keep) < len(active_list):
                    keep_t = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(keep_t)
                    active = active.index_select(0, keep_t)
                    attention = attention.index_select(0, keep_t)
                    next_pos = next_pos.index_select(0, keep_t)
                    keys = keys.index_select(0, keep_t)
                    tokens = tokens.index_select(0, keep_t)
                    state.plan = select_rows(state.plan, keep_t)
                live = tokens.shape[0]
                if static:
                    attention[:, length] = 1
                else:
                    attention = torch.cat(
                        [attention, torch.ones((live, 1), dtype=attention.dtype, device=dev)], 1
                    )
                length += 1
                state.prompt = torch.zeros((live, 1), dtype=torch.bool, device=dev)
                state.response = torch.ones((live, 1), dtype=torch.bool, device=dev)
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=attention[:, :length],
                    position_ids=next_pos[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                next_pos = next_pos + 1
                tokens_in += len(keep)
                logits = out.logits[:, -1, :].float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
        self._count(count, tokens_in)
        return self._results(batch, rows, generated, finish, step_logprobs, params)

    def _results(
        self,
        batch: Sequence[EngineItem],
        rows: list[int],
        generated: Sequence[Sequence[int]],
        finish: list[str],
        step_logprobs: list[list[StepLogprob]],
        params: GenParams,
    ) -> list[tuple[int, GenResult]]:
        results: list[tuple[int, GenResult]] = []
        for b in range(len(batch)):
            ids = [int(t) for t in generated[b]]
            body = ids[:-1] if ids and ids[-1] in self.eos_ids and finish[b] == "stop" else ids
            text = str(self.tokenizer.decode(body, skip_special_tokens=True))
            for s in params.stop:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            results.append(
                (
                    rows[b],
                    GenResult(
                        text=text,
                        token_ids=ids,
                        finish_reason=finish[b],
                        prompt_tokens=len(batch[b].prompt_ids),
                        logprobs=step_logprobs[b] if params.logprobs else None,
                    ),
                )
            )
        return results

    @torch.inference_mode()
    def _generate_fast(
        self, items: Sequence[EngineItem], rows: list[int], params: GenParams
    ) -> list[tuple[int, GenResult]]:
        """Generate through ``fastgen`` (see there): prefix-shared prefill, then decode steps
        (replayed from the call's CUDA graph on a GPU). Host bookkeeping is whole-array numpy;
        on a non-static (CPU) run finished rows leave the batch."""
        fast = self.fast
        assert fast is not None
        batch = [items[i] for i in rows]
        count = len(batch)
        steps = params.max_new_tokens
        # One more plan row than the batch: the unsteered shared prefix.
        plan = self._plan([it.steering for it in batch] + [[]])
        first = [first_prompt_layer(it.steering, self.num_layers) for it in batch]
        run = fast.start([it.prompt_ids for it in batch], plan, first, steps, self.checkpoint)
        logits = run.logits  # from self._logits: soft-capped where the model caps
        keys = torch.tensor([it.seed & _M32 for it in batch], dtype=torch.int64, device=self.device)
        eos = np.array(sorted(self.eos_ids), dtype=np.int64)
        generated = np.zeros((count, steps), dtype=np.int64)
        lengths = np.zeros(count, dtype=np.int64)
        finished = np.zeros(count, dtype=bool)
        finish = ["length"] * count
        step_logprobs: list[list[StepLogprob]] = [[] for _ in range(count)]
        active = np.arange(count)  # batch row of each run row
        stop_window = max((len(s) for s in params.stop), default=0) + 8
        tokens_in = sum(len(it.prompt_ids) for it in batch)
        for step in range(steps):
            self.checkpoint()
            tokens = self._sample(logits, params, keys, step)
            if params.logprobs:
                self._record_logprobs(
                    logits,
                    tokens,
                    torch.from_numpy(active),
                    params.top_logprobs,
                    step_logprobs,
                    finished.tolist(),
                )
            chosen = tokens.cpu().numpy()
            live = ~finished[active]
            grow = active[live]
            generated[grow, lengths[grow]] = chosen[live]
            lengths[grow] += 1
            if not params.ignore_eos:
                ended = active[live & np.isin(chosen, eos)]
                finished[ended] = True
                for row in ended.tolist():
                    finish[row] = "stop"
            if params.stop:
                for row in grow[~finished[grow]].tolist():
                    tail = self.tokenizer.decode(
                        generated[row, max(0, lengths[row] - stop_window) : lengths[row]].tolist()
                    )
                    if any(s in tail for s in params.stop):
                        finish[row] = "stop"
                        finished[row] = True
            still = ~finished[active]
            if not still.any() or step + 1 == steps:
                break
            if not fast.static and not still.all():
                keep = torch.from_numpy(np.nonzero(still)[0]).to(self.device)
                run.select(keep)
                active, keys, tokens = active[still], keys[keep], tokens[keep]
            tokens_in += int(still.sum())
            logits = run.step(tokens, step, steps - step - 2)
        self._count(count, tokens_in)
        out = [generated[b, : lengths[b]].tolist() for b in range(count)]
        return self._results(batch, rows, out, finish, step_logprobs, params)

    def _record_logprobs(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        active: torch.Tensor,
        top: int,
        sink: list[list[StepLogprob]],
        finished: list[bool],
    ) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        if top > 0:
            top_lp, top_ids = torch.topk(logprobs, top, dim=-1)
            top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        for j, row in enumerate(active.tolist()):
            if finished[row]:
                continue
            tid = int(tokens[j])
            alts: tuple[tuple[int, str, float], ...] = ()
            if top > 0:
                alts = tuple(
                    (int(t), self.token_string(int(t)), float(lp))
                    for t, lp in zip(top_ids_l[j], top_lp_l[j], strict=True)
                )
            sink[row].append(StepLogprob((tid, self.token_string(tid), float(chosen[j])), alts))

    # ------------------------------------------------------------------ info
    def parameter_bytes(self) -> int:
        try:
            return int(self.model.get_memory_footprint())
        except Exception:
            return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        """Geometry and capabilities of the loaded model."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "parameter_bytes": self.parameter_bytes(),
            "supports_chat_template": self.has_chat_template,
            "supports_system_role": self.has_system_role,
            "vocab_size": self.vocab_size,
            "quantization_config": self.loaded.quantization_config,
            "notes": list(self.loaded.notes) + self._path_notes(),
        }

    def _path_notes(self) -> list[str]:
        """Why a fast path is off for this model (generation, decode graphs, capture graphs)."""
        notes = []
        if self.fast_disabled:
            notes.append(
                f"fast generation path off (transformers' generation): {self.fast_disabled}"
            )
        on_gpu = self.device.type == "cuda"
        if on_gpu and self.fast is not None and self.fast.graphs_disabled:
            notes.append(f"decode CUDA graphs off: {self.fast.graphs_disabled}")
        if on_gpu and self.graphs.disabled:
            notes.append(f"capture CUDA graphs off: {self.graphs.disabled}")
        return notes
