"""The loader's own generation path for Llama-family decoders: prefix sharing, length-sorted
prefill chunks, a KV cache sized to the request and decode steps replayed from a CUDA graph.

Why: at real model sizes transformers' ``generate`` ran the loader's steered sweep about 5x off
what an H100 allows (issue 16: 1 100 rows of a Llama-3.1-8B-shaped model, 70 ms per decode step
against a floor of 8-10 ms). This path calls the model's own modules (projections, norms, MLP,
rotary embedding: quantized linears work unchanged) in a loop it controls:

* **Prefix sharing.** Rows of one call that share a prompt compute it once below the first
  layer at which their steering touches prompt tokens (``steering.first_prompt_layer``): a
  row steered at layer 12 on every position shares layers 0-11 of its prompt's prefill with
  its siblings, a row steered on response tokens only (or not at all) shares the whole
  prefill and its first token's logits. Below that layer a row's prompt computes bit for bit
  what the shared stream computes (zero offsets are exact no-ops), so only the batch shape
  differs. At each layer the batch holds the shared streams still needed and the rows that
  have left them; a row leaves with a copy of its stream's hidden states, and every layer's
  keys and values are written to each row it stands for.
* **Prefill in length-sorted chunks**: rows sorted by prompt length and cut into chunks of
  at most ``prefill_tokens`` (rows and streams times width) whose padding stays under 1/16
  once a chunk holds ``min_chunk_tokens``: padded tokens are computed tokens.
* **A KV cache sized to the request**: ``[layers, 2, rows, kv heads, prompt width + new
  tokens, head dim]`` (width rounded up to 16; columns before kv heads where flash decode
  runs), zeroed, with a per-row validity mask; prompts are right-aligned at the prompt width,
  decode step ``s`` writes column ``width + s``.
* **One matmul for q/k/v and one for gate/up** where they are plain linears: the modules'
  weights are re-pointed to slices of one tensor (the modules compute what they did, no memory
  is added); quantized linears keep their own kernels.
* **Decode attention reading each row's own keys**: on a GPU one Triton kernel
  (``decode_triton``: a program per row and key/value head reads the row's filled keys once
  for all its query heads; setting ``decode_kernel``), else torch's flash kernel with per-row
  key offsets and used lengths (``fastgen_kernels.DecodeFlash``), elsewhere one fused SDPA
  over the masked cache with the query heads of a key/value head as query positions of one
  head (nothing repeated per query head).
* **Decode steps from a CUDA graph**: the first decode step of a call is recorded (on a GPU)
  and every later step replays it: the per-step Python and kernel-launch cost of a 16-32
  layer forward goes. The graph's inputs are two static buffers (tokens, step); it writes the
  step's keys and values into the call's cache and its logits into its own output. Rows that
  finish keep computing (static shapes); on a CPU the same static step runs without a graph
  for tests, and the default CPU path drops finished rows from the batch instead.

Capture runs through the same layer loop (``capture_forward``; the engine's eager capture
and the capture graphs' recorded body): fused norms, and nothing past the last captured layer.

Steering is applied by the same functions as the hooks (``hooks.apply_plan`` on a layer's
output, ``hooks.ablate_only`` on its input and attention output), so it means the same on
both paths. A failure to record a graph switches graphs off for the engine (logged); the call
goes on eagerly.

Why one module of about 790 lines (above the project's ~500): the layer loop
(``FastGenerator``, with packed capture) and the per-call state it prefills and steps
(``FastRun``) share the cache layout, the stream composition and the graph buffers; apart, each
half reads only against the other. The compiled, varlen and flash decode kernels live in
``fastgen_kernels``, the Triton decode kernel in ``decode_triton``. It belongs to the transformers engine (``services.loader.engines.hf``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import FailedPrecondition
from services.common.logging import get_logger
from services.loader.capture_graphs import pad_arrays
from services.loader.decode_triton import DecodeTriton
from services.loader.fastgen_kernels import DecodeFlash, Fused, VarlenAttention
from services.loader.hooks import ForwardState, ablate_only, apply_plan
from services.loader.steering import SteeringPlan, select_rows
from services.loader.transfer import is_oom, to_device

__all__ = ["FastGenerator", "FastRun", "FusedLinear", "prefill_chunks", "unsupported_reason"]

log = get_logger(__name__)

# Decoders whose base model is embed -> layers(norm, attention, norm, MLP) -> norm with
# rotate-half rotary embeddings and no per-layer attention variants.
SUPPORTED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_SILU = frozenset({"SiLU", "SiLUActivation"})  # torch's and transformers' (ACT2FN["silu"])
# Attention goes through this function: an additive mask, no dropout.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unsupported_reason(model: nn.Module, config: Any, layers: nn.ModuleList) -> str | None:
    """Why the fast path cannot run ``model`` (None: it can)."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in SUPPORTED_TYPES:
        return f"model type {model_type!r} (fast path: {', '.join(sorted(SUPPORTED_TYPES))})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", model_type == "mistral"):
        return "sliding-window attention"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)}"
    base = getattr(model, str(getattr(model, "base_model_prefix", "model")), None)
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if base is None or getattr(base, name, None) is None:
            return f"base model without {name}"
    for index, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        if attn is None or any(getattr(layer, p, None) is None for p in parts):
            return f"layer {index} is not a Llama-style decoder layer"
        if any(getattr(attn, p, None) is None for p in _ATTN_PARTS):
            return f"layer {index}'s attention has no q/k/v/o projections"
    return None


def prefill_chunks(
    lengths: Sequence[int], groups: Sequence[int], *, budget: int, min_tokens: int
) -> list[list[int]]:
    """Row indices cut into prefill chunks, longest first, the rows of a group (one prompt)
    together. A chunk's cost is (rows + distinct groups) x its width, at most ``budget`` (a
    row alone may pass it); once a chunk holds ``min_tokens`` real tokens it ends where the
    next row would pad it by more than 1/16 of its width."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], groups[i], i))
    chunks: list[list[int]] = []
    current: list[int] = []
    seen: set[int] = set()
    width = real = 0
    for i in order:
        size = lengths[i]
        units = len(current) + 1 + len(seen | {groups[i]})
        wasteful = size * 16 < width * 15 and real >= min_tokens
        if current and (units * width > budget or wasteful):
            chunks.append(current)
            current, seen, width, real = [], set(), 0, 0
        if not current:
            width = size
        current.append(i)
        seen.add(groups[i])
        real += size
    if current:
        chunks.append(current)
    return chunks


class FusedLinear:
    """Linears that read the same input, computed as one matmul: their weights (and biases)
    were re-pointed to slices of one tensor, so the modules compute exactly what they did and
    no memory is added. Unusable while a module carries a forward hook (hooks must run)."""

    def __init__(self, modules: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None):
        self.modules = modules
        self.weight = weight
        self.bias = bias
        self.sizes = [int(m.weight.shape[0]) for m in modules]

    def usable(self) -> bool:
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(F.linear(x, self.weight, self.bias), self.sizes, dim=-1))


def _fuse(modules: list[Any]) -> FusedLinear | None:
    """Re-point plain ``nn.Linear`` modules (same device, dtype and bias-ness) to slices of one
    concatenated weight; None where they are not (quantized linears keep their own kernels)."""
    if not all(type(m) is nn.Linear for m in modules):
        return None
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    if len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1:
        return None
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        start = 0
        for m in modules:
            rows = int(m.weight.shape[0])
            m.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
            start += rows
    return FusedLinear(modules, weight, bias)


@dataclass
class RunStats:
    """What one call computed (the bench turns these into its roofline of shared work)."""

    rows: int = 0
    width: int = 0
    chunks: int = 0
    # Sum over layer calls of units x width (padded) and of the units' real prompt tokens.
    prefill_layer_tokens: int = 0
    prefill_real_layer_tokens: int = 0
    decode_steps: int = 0
    graph: str = "none"  # "replayed", "eager" (CPU / graphs off) or "none" (no decode step)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Chunk:
    """The distinct prompts of a prefill chunk on the device, left-padded to ``width``."""

    ids: torch.Tensor  # [S, w]
    positions: torch.Tensor  # [S, w]
    keys: torch.Tensor  # [S, w] bool: real tokens
    bias: torch.Tensor  # [S, 1, w, w] additive causal bias
    width: int
    lengths: list[int]


@dataclass
class _Composition:
    """The unit batch of a prefill chunk between two layers where rows leave their streams."""

    sources: torch.Tensor  # each unit's index in the previous composition
    cos: torch.Tensor
    sin: torch.Tensor
    state: ForwardState
    attend: Attend
    real_tokens: int


class FastGenerator:
    """The fast generation path of one model; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        layers: nn.ModuleList,
        config: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pad_id: int,
        logits: Callable[[torch.Tensor], torch.Tensor],
        use_graphs: bool,
        static: bool,
        graphs_disabled: str | None = None,
        prefill_tokens: int = 32768,
        min_chunk_tokens: int = 8192,
        compile_elementwise: bool = False,
        compile_min_tokens: int = 2048,
        decode_triton: bool = False,
    ) -> None:
        self.model = model
        self.base: Any = getattr(model, str(getattr(model, "base_model_prefix", "model")))
        self.layers = layers
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.logits = logits
        attn: Any = layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.groups = self.heads // self.kv_heads
        self.scale = float(attn.scaling)
        # Static decode steps (no rows dropped): required for graphs, settable on a CPU.
        self.static = static or use_graphs
        self.use_graphs = use_graphs
        self.graphs_disabled = graphs_disabled
        self.share_prefix = True
        self.fused_norm = True
        self.prefill_tokens = prefill_tokens
        self.min_chunk_tokens = min_chunk_tokens
        # One matmul for q/k/v and one for gate/up where they are plain linears (see _fuse).
        decoders: list[Any] = list(layers)
        self.qkv = [
            _fuse([d.self_attn.q_proj, d.self_attn.k_proj, d.self_attn.v_proj]) for d in decoders
        ]
        self.gate_up = [
            _fuse([d.mlp.gate_proj, d.mlp.up_proj])
            if hasattr(d.mlp, "gate_proj") and hasattr(d.mlp, "act_fn")
            else None
            for d in decoders
        ]
        self.fused = Fused(compile_elementwise, compile_min_tokens)
        self.varlen = VarlenAttention()  # packed capture's attention on a GPU
        # Decode attention on a GPU: the Triton kernel (setting ``decode_kernel``, the
        # default), torch's flash kernel where it is off or told so.
        on_gpu = device.type == "cuda"
        self.decode_triton = (
            DecodeTriton(on_gpu) if decode_triton else DecodeTriton(False, "not asked for")
        )
        self.decode_flash = DecodeFlash(on_gpu)
        self.recorded = 0  # decode graphs recorded
        self.replays = 0  # decode steps replayed from a graph
        self.last: RunStats | None = None

    @property
    def varlen_disabled(self) -> str | None:
        """Why packed capture attends in the padded layout (None: varlen is on)."""
        return self.varlen.disabled

    @varlen_disabled.setter
    def varlen_disabled(self, reason: str | None) -> None:
        self.varlen.disabled = reason

    # ------------------------------------------------------------------ the layer loop
    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An RMSNorm module applied to ``x``: one fused kernel where the module is a plain
        Llama-style RMSNorm (the module's own code is several float32 passes)."""
        hooked = module._forward_hooks or module._forward_pre_hooks
        if self.fused_norm and type(module).__name__ in _RMS_NORMS and not hooked:
            weight: Any = module.weight
            eps = float(getattr(module, "variance_epsilon", 1e-6))
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        out: torch.Tensor = module(x)
        return out

    def layer(
        self,
        index: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: ForwardState,
        attend: Attend,
    ) -> torch.Tensor:
        """Decoder layer ``index`` on ``hidden`` [B, T, H], steered by ``state`` as the hooks
        steer it; ``attend`` writes the keys/values and attends (prefill or decode)."""
        layer: Any = self.layers[index]
        attn = layer.self_attn
        plan = state.plan.layers.get(index)
        if plan is not None and plan.ablations:
            hidden = ablate_only(hidden, plan, state)
        x = self.norm(layer.input_layernorm, hidden)
        batch, tokens, _ = x.shape
        shape = (batch * tokens, -1, self.head_dim)  # tokens flattened: [N, heads, D]
        fused = self.qkv[index]
        if fused is not None and fused.usable():
            q, k, v = (t.reshape(shape) for t in fused(x))
        else:
            q = attn.q_proj(x).reshape(shape)
            k = attn.k_proj(x).reshape(shape)
            v = attn.v_proj(x).reshape(shape)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q_norm is not None and k_norm is not None:  # Qwen3: per-head norms before rotary
            q, k = q_norm(q), k_norm(k)
        flat = (batch * tokens, 1, self.head_dim)
        q, k = self.fused.rope(q, k, cos.reshape(flat), sin.reshape(flat))
        q, k, v = (t.view(batch, tokens, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = attn.o_proj(attend(index, q, k, v))
        if plan is not None and plan.ablations:
            out = ablate_only(out, plan, state)
        hidden = hidden + out
        hidden = hidden + self._mlp(
            index, layer.mlp, self.norm(layer.post_attention_layernorm, hidden)
        )
        if plan is not None:
            hidden = apply_plan(hidden, plan, state)
        return hidden

    def _mlp(self, index: int, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP: ``down(act(gate(x)) * up(x))`` with gate and up as one matmul."""
        fused = self.gate_up[index]
        if fused is None or not fused.usable() or mlp._forward_hooks or mlp._forward_pre_hooks:
            out: torch.Tensor = mlp(x)
            return out
        if type(mlp.act_fn).__name__ in _SILU:
            flat = F.linear(x, fused.weight, fused.bias)
            act = self.fused.silu_mul(flat.reshape(-1, flat.shape[-1]))
            result: torch.Tensor = mlp.down_proj(act.view(*x.shape[:-1], -1))
            return result
        gate, up = fused(x)
        result = mlp.down_proj(mlp.act_fn(gate) * up)
        return result

    def rotary(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary (cos, sin) [B, T, D] for ``positions`` [B, T]."""
        cos, sin = self.base.rotary_emb(hidden, positions)
        return cos, sin

    def causal_bias(self, attention: torch.Tensor) -> torch.Tensor:
        """Additive [B, 1, T, T] bias of a padded batch (``attention`` [B, T] bool): causal
        over real keys, every query attends to itself (padding too: no softmax over nothing)."""
        width = attention.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=attention.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=attention.device)
        allowed = (causal[None] & attention[:, None, :]) | eye[None]
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=attention.device)
        return bias.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]

    def capture_forward(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        state: ForwardState,
    ) -> torch.Tensor:
        """Capture through the layer loop (``hooks.capture_forward``'s contract): ``state``'s
        steering applied, its sink's layers recorded after it, nothing computed past the
        sink's last layer. ``attention`` [B, T] bool."""
        sink = state.capture
        if sink is None:
            raise FailedPrecondition("capture_forward needs a ForwardState with a CaptureSink")
        bias = self.causal_bias(attention)
        hidden = self.base.embed_tokens(input_ids)
        cos, sin = self.rotary(hidden, positions)

        def attend(_i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._prefill_attention(q, k, v, bias)

        last = max(sink.layers) if sink.stop_after is None else sink.stop_after
        for index in range(last + 1):
            hidden = self.layer(index, hidden, cos, sin, state, attend)
            if index in sink.layers:
                sink.record(index, hidden)
        return sink.result()

    def capture_packed(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        state: ForwardState,
    ) -> torch.Tensor:
        """``capture_forward`` of an unsteered padded batch with its padding left out: the
        real tokens are packed into one row for the per-token work (norms, projections,
        rotary, MLP) and scattered into the padded layout for attention only, and each
        recorded layer back into it for the sink. Rows of different lengths then cost their
        tokens, not the batch's width (the H100 capture bench: 13% of the batch was padding,
        against ~3% of a layer's time for the two copies around attention)."""
        sink = state.capture
        if sink is None or not state.plan.empty:
            raise FailedPrecondition("capture_packed needs an unsteered state with a sink")
        rows, width = attention.shape
        total = rows * width
        flat = attention.reshape(-1).nonzero().squeeze(1)  # the real tokens, row by row
        hidden = self.base.embed_tokens(input_ids.reshape(-1).index_select(0, flat)[None])
        cos, sin = self.rotary(hidden, positions.reshape(-1).index_select(0, flat)[None])
        lengths = attention.sum(dim=1)
        varlen = (
            self.varlen.for_lengths(lengths, self.scale, self.groups)
            if self.device.type == "cuda"
            else None
        )
        biases: list[torch.Tensor] = []  # the padded layout's mask, built when first needed

        def padded(t: torch.Tensor) -> torch.Tensor:  # [1, h, N, D] -> [B, h, T, D]
            heads = t.shape[1]
            out = t.new_zeros(total, heads, self.head_dim)
            out.index_copy_(0, flat, t[0].transpose(0, 1))
            return out.view(rows, width, heads, self.head_dim).transpose(1, 2)

        def attend(_i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if varlen is not None:
                packed = varlen(*(t[0].transpose(0, 1) for t in (q, k, v)))
                if packed is not None:
                    return packed.reshape(1, packed.shape[0], -1)
            if not biases:
                biases.append(self.causal_bias(attention))
            out = self._prefill_attention(padded(q), padded(k), padded(v), biases[0])
            return out.reshape(total, -1).index_select(0, flat)[None]

        def unpacked(h: torch.Tensor) -> torch.Tensor:  # [1, N, H] -> [B, T, H]
            out = h.new_zeros(total, h.shape[-1])
            out.index_copy_(0, flat, h[0])
            return out.view(rows, width, -1)

        # Where attention runs packed (varlen, a GPU) a mean reduces from the packed layout
        # too; elsewhere through the padded layout, so that an unsteered capture equals a
        # steered one at coefficient 0 bit for bit (the same reduction, same order).
        packed_mean = sink.packed_mean(flat) if varlen is not None else None
        last = max(sink.layers) if sink.stop_after is None else sink.stop_after
        for index in range(last + 1):
            hidden = self.layer(index, hidden, cos, sin, state, attend)
            if index not in sink.layers:
                continue
            if packed_mean is not None:
                sink.record_reduced(index, packed_mean.reduce(hidden[0]))
            else:
                sink.record(index, unpacked(hidden))
        return sink.result()

    # ------------------------------------------------------------------ a call
    def start(
        self,
        prompts: Sequence[list[int]],
        plan: SteeringPlan,
        first: Sequence[int],
        max_new_tokens: int,
        checkpoint: Callable[[], None],
    ) -> FastRun:
        """Prefill ``prompts`` (``plan`` has one more row than ``prompts``: the unsteered
        stream; ``first[r]``: the first layer at which row r's steering touches its prompt)
        and return the call's run, its first logits in ``run.logits``."""
        run = FastRun(self, prompts, plan, max_new_tokens)
        lengths = [len(p) for p in prompts]
        ids: dict[tuple[int, ...], int] = {}
        groups = [ids.setdefault(tuple(p), len(ids)) for p in prompts]
        run.first = list(first) if self.share_prefix else [0] * len(prompts)
        for chunk in prefill_chunks(
            lengths, groups, budget=self.prefill_tokens, min_tokens=self.min_chunk_tokens
        ):
            checkpoint()
            self._prefill_chunk(run, chunk, prompts, groups, run.first)
        self.last = run.stats
        return run

    def _prefill_chunk(
        self,
        run: FastRun,
        rows: list[int],
        prompts: Sequence[list[int]],
        groups: Sequence[int],
        first: Sequence[int],
    ) -> None:
        """Prefill the rows of one chunk layer by layer: see "Prefix sharing" above."""
        streams: dict[int, int] = {}  # group -> stream (one per distinct prompt)
        heads: list[int] = []  # a row holding each stream's prompt
        for r in rows:
            if groups[r] not in streams:
                streams[groups[r]] = len(heads)
                heads.append(r)
        stream_of = {r: streams[groups[r]] for r in rows}
        chunk = self._pad_streams([prompts[r] for r in heads])
        layers = len(self.layers)
        reach = [0] * len(heads)  # stream j is computed at layer l while reach[j] > l
        for r in rows:
            reach[stream_of[r]] = max(reach[stream_of[r]], first[r])
        changes = {0, *(first[r] for r in rows), *reach}
        hidden = self.base.embed_tokens(chunk.ids)
        cos, sin = self.rotary(hidden, chunk.positions)
        units: list[tuple[str, int]] = [("s", j) for j in range(len(heads))]
        comp: _Composition | None = None
        for index in range(layers):
            if index in changes or comp is None:
                previous = {u: i for i, u in enumerate(units)}
                kept = [u for u in units if u[0] == "r" or reach[u[1]] > index]
                leaving = [("r", r) for r in rows if first[r] == index]
                units = kept + leaving
                sources = [previous[u] for u in kept]
                sources += [previous[("s", stream_of[r])] for _, r in leaving]
                comp = self._compose(run, chunk, units, sources, stream_of, index, (cos, sin))
                hidden = hidden.index_select(0, comp.sources)
            hidden = self.layer(index, hidden, comp.cos, comp.sin, comp.state, comp.attend)
            run.stats.prefill_layer_tokens += len(units) * chunk.width
            run.stats.prefill_real_layer_tokens += comp.real_tokens
        last = self.logits(self.norm(self.base.norm, hidden[:, -1]))
        where = {u: i for i, u in enumerate(units)}
        pick = [where.get(("r", r), where.get(("s", stream_of[r]), -1)) for r in rows]
        index_pair = to_device(torch.tensor([rows, pick], dtype=torch.int64), self.device)
        run.set_logits(index_pair[0], last.index_select(0, index_pair[1]))
        run.stats.chunks += 1

    def _pad_streams(self, prompts: list[list[int]]) -> _Chunk:
        """The distinct prompts of a chunk left-padded, with their causal attention bias."""
        ids, positions, _, attention, _, _ = pad_arrays(
            [(p, len(p)) for p in prompts], "left", self.pad_id
        )
        width = ids.shape[1]
        col = np.arange(width)
        allowed = (col[None, :, None] >= col[None, None, :]) & attention[:, None, :]
        allowed |= np.eye(width, dtype=bool)[None]  # padding queries attend to themselves
        ints = to_device(torch.from_numpy(np.stack([ids, positions])), self.device)
        masks = to_device(
            torch.from_numpy(np.concatenate([attention[:, None, :], allowed], axis=1)),
            self.device,
        )
        bias = torch.zeros((len(prompts), 1, width, width), dtype=self.dtype, device=self.device)
        bias.masked_fill_(~masks[:, None, 1:], torch.finfo(self.dtype).min)
        return _Chunk(ints[0], ints[1], masks[:, 0], bias, width, [len(p) for p in prompts])

    def _compose(
        self,
        run: FastRun,
        chunk: _Chunk,
        units: list[tuple[str, int]],
        sources: list[int],
        stream_of: dict[int, int],
        index: int,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> _Composition:
        """A new unit batch from layer ``index`` on: where each unit's hidden states come
        from, its stream's inputs, the cache rows it writes and its steering."""
        unit_stream = [u[1] if u[0] == "s" else stream_of[u[1]] for u in units]
        plan_rows = [run.rows if u[0] == "s" else u[1] for u in units]  # run.rows: unsteered
        riding: dict[int, list[int]] = collections.defaultdict(list)
        for r, j in stream_of.items():
            if run.first[r] > index:
                riding[j].append(r)
        dst: list[int] = []
        dst_src: list[int] = []
        for i, (kind, n) in enumerate(units):
            targets = riding[n] if kind == "s" else [n]
            dst.extend(targets)
            dst_src.extend([i] * len(targets))
        packed = to_device(torch.tensor([sources, unit_stream, plan_rows]), self.device)
        pairs = to_device(torch.tensor([dst, dst_src], dtype=torch.int64), self.device)
        stream = packed[1]
        keys = chunk.keys.index_select(0, stream)
        state = ForwardState(keys, torch.zeros_like(keys), select_rows(run.plan, packed[2]))
        bias = chunk.bias.index_select(0, stream)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            run.write_prefill(i, k, v, pairs[0], pairs[1])
            return self._prefill_attention(q, k, v, bias)

        return _Composition(
            sources=packed[0],
            cos=rotary[0].index_select(0, stream),
            sin=rotary[1].index_select(0, stream),
            state=state,
            attend=attend,
            real_tokens=sum(chunk.lengths[j] for j in unit_stream),
        )

    def _prefill_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention of padded prompts: ``bias`` [U, 1, w, w] additive."""
        units, _, width, dim = q.shape
        if self.groups > 1:
            shape = (units, self.kv_heads, self.groups, width, dim)
            k = k[:, :, None].expand(shape).reshape(units, self.heads, width, dim)
            v = v[:, :, None].expand(shape).reshape(units, self.heads, width, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.transpose(1, 2).reshape(units, width, self.heads * dim)

    def decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row against the cache: ``q`` [B, heads, 1, D], ``keys``/``values``
        [B, kv heads, L, D], ``bias`` [B, 1, 1, L] additive. A key/value head's query heads
        are its query *positions* (same mask for each), so nothing is repeated."""
        rows = q.shape[0]
        grouped = q.reshape(rows, self.kv_heads, self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=bias, scale=self.scale
        )
        return out.reshape(rows, 1, self.heads * self.head_dim)


class FastRun:
    """One call's cache and decode state (see the module docstring)."""

    def __init__(
        self,
        gen: FastGenerator,
        prompts: Sequence[list[int]],
        plan: SteeringPlan,
        max_new_tokens: int,
    ) -> None:
        self.gen = gen
        self.rows = len(prompts)
        self.plan = plan
        self.first: Sequence[int] = ()
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=self.rows)
        self.width = int(-(-int(lengths.max()) // 16) * 16)
        # Columns: prompts right-aligned at ``width``; decode step s writes ``width + s``.
        self.length = self.width + -(-max(1, max_new_tokens) // 16) * 16
        dev = gen.device
        # With a decode kernel (Triton or flash) [layer, k/v, row, column, kv head, D]: a
        # layer's keys are one [rows x columns] run of tokens, so the kernel reads each row's
        # own columns in place. Otherwise [.., row, kv head, column, D], what SDPA reads
        # without a copy.
        self.token_major = gen.decode_triton.usable(
            gen.dtype, gen.head_dim
        ) or gen.decode_flash.usable(gen.dtype)
        inner = (self.length, gen.kv_heads) if self.token_major else (gen.kv_heads, self.length)
        self.kv = torch.zeros(
            (len(gen.layers), 2, self.rows, *inner, gen.head_dim), dtype=gen.dtype, device=dev
        )
        col = np.arange(self.length)[None, :]
        valid = (col >= self.width - lengths[:, None]) & (col < self.width)
        host = torch.from_numpy(np.stack([lengths, np.zeros_like(lengths)]))
        self.plen, self.tokens = to_device(host, dev).unbind(0)
        self.tokens = self.tokens.clone()
        self.valid = to_device(torch.from_numpy(valid), dev)
        self.step_t = torch.zeros(1, dtype=torch.int64, device=dev)
        self.cu = self._flash_offsets()  # None where decode attends through SDPA
        self.logits = torch.empty((self.rows, 0), dtype=torch.float32, device=dev)
        decode_plan = select_rows(plan, torch.arange(self.rows, device=dev))
        self.state = ForwardState(
            torch.zeros((self.rows, 1), dtype=torch.bool, device=dev),
            torch.ones((self.rows, 1), dtype=torch.bool, device=dev),
            decode_plan,
        )
        self.graph: Any = None
        self.graph_out: torch.Tensor | None = None
        self.stats = RunStats(rows=self.rows, width=self.width)

    def _flash_offsets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decode kernels' offsets (int32, [B + 1] each): query i is token i; row r's
        keys start at its first prompt column of the flattened [rows x columns]. None for a
        head-major cache (no decode kernel)."""
        if not self.token_major:
            return None
        rows = self.plen.shape[0]
        ends = torch.arange(rows + 1, device=self.plen.device)
        starts = ends * self.length
        starts[:-1] += self.width - self.plen
        return ends.to(torch.int32), starts.to(torch.int32)

    def write_prefill(
        self, index: int, k: torch.Tensor, v: torch.Tensor, dst: torch.Tensor, src: torch.Tensor
    ) -> None:
        """Prefill keys/values [U, kv heads, w, D] of layer ``index`` into rows ``dst`` (from
        units ``src``), right-aligned at the prompt width."""
        start = self.width - k.shape[2]
        for which, t in enumerate((k, v)):
            rows = t.index_select(0, src)
            if self.token_major:
                self.kv[index, which, dst, start : self.width] = rows.transpose(1, 2)
            else:
                self.kv[index, which, dst, :, start : self.width] = rows

    def set_logits(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        if self.logits.shape[1] != logits.shape[1]:
            self.logits = torch.empty(
                (self.rows, logits.shape[1]), dtype=logits.dtype, device=logits.device
            )
        self.logits[rows] = logits

    # ------------------------------------------------------------------ decode
    def body(self) -> torch.Tensor:
        """One decode step on the static buffers: feed ``tokens`` at step ``step_t``, write
        their keys/values at column ``width + step`` and return the next logits [B, V]."""
        gen = self.gen
        col = self.step_t + self.width
        self.valid.index_fill_(1, col, True)
        neg = torch.finfo(gen.dtype).min
        bias = torch.zeros(self.valid.shape, dtype=gen.dtype, device=self.valid.device)
        bias = bias.masked_fill(~self.valid, neg)[:, None, None, :]
        positions = (self.plen + self.step_t)[:, None]
        hidden = gen.base.embed_tokens(self.tokens[:, None])
        cos, sin = gen.rotary(hidden, positions)
        kv = self.kv

        flash = self.cu
        used = None if flash is None else (self.plen + self.step_t + 1).to(torch.int32)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = kv[i, 0], kv[i, 1]
            if flash is None or used is None:
                keys.index_copy_(2, col, k)
                values.index_copy_(2, col, v)
                return gen.decode_attention(q, keys, values, bias)
            keys.index_copy_(1, col, k.transpose(1, 2))
            values.index_copy_(1, col, v.transpose(1, 2))
            out = gen.decode_triton(q[:, :, 0], keys, values, flash, used, gen.scale)
            if out is None and gen.decode_flash.usable(gen.dtype):
                out = gen.decode_flash(q[:, :, 0], keys, values, flash, used, gen.scale)
            if out is not None:
                return out.reshape(out.shape[0], 1, -1)
            return gen.decode_attention(q, keys.transpose(1, 2), values.transpose(1, 2), bias)

        for index in range(len(gen.layers)):
            hidden = gen.layer(index, hidden, cos, sin, self.state, attend)
        return gen.logits(gen.norm(gen.base.norm, hidden[:, -1]))

    def step(self, tokens: torch.Tensor, step: int, steps_left: int) -> torch.Tensor:
        """Logits after feeding ``tokens`` [B] as decode step ``step`` (from the call's graph
        where one is recorded or worth recording: ``steps_left`` more steps follow)."""
        gen = self.gen
        self.tokens.copy_(tokens)
        self.step_t.fill_(step)
        self.stats.decode_steps += 1
        if self.graph is None and gen.use_graphs and not gen.graphs_disabled and steps_left >= 2:
            self._record()
        if self.graph is not None:
            self.graph.replay()
            gen.replays += 1
            assert self.graph_out is not None
            return self.graph_out
        if self.stats.graph == "none":
            self.stats.graph = "eager"
        return self.body()

    def _record(self) -> None:
        gen = self.gen
        dev = gen.device
        current = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):  # warm-up off the capture stream (allocator, cuBLAS)
                self.body()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.body()
        except Exception as exc:
            if is_oom(exc):
                raise
            gen.graphs_disabled = f"{type(exc).__name__}: {exc}"
            log.warning("decode graphs switched off", extra={"reason": gen.graphs_disabled})
            return
        # The warm-up ran this step already; the replay that follows recomputes it (the same
        # keys/values into the same column), so the graph's output holds this step's logits.
        self.graph, self.graph_out = graph, out
        gen.recorded += 1
        self.stats.graph = "replayed"

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (eager, non-static runs: finished rows leave the batch)."""
        self.kv = self.kv.index_select(2, keep)
        self.valid = self.valid.index_select(0, keep)
        self.plen = self.plen.index_select(0, keep)
        self.cu = self._flash_offsets()
        self.tokens = self.tokens.index_select(0, keep)
        self.state = ForwardState(
            self.state.prompt.index_select(0, keep),
            self.state.response.index_select(0, keep),
            select_rows(self.state.plan, keep),
        )
