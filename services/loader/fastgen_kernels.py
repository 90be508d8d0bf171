"""The fast path's fused and variable-length kernels (``services.loader.fastgen``): rotary
embedding and SiLU x up compiled by ``torch.compile`` for large batches on a GPU, and causal
attention over packed rows with torch's variable-length flash kernel. Each switches itself off
for the engine at its first failure (logged and shown in ``Info``), and the caller goes on with
the eager or padded equivalent, so a torch without the kernel or compiler only loses speed."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from services.common.logging import get_logger
from services.loader.transfer import is_oom

__all__ = ["DecodeFlash", "Fused", "VarlenAttention", "rope", "silu_mul"]

log = get_logger(__name__)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of ``q`` [N, heads, D] and ``k`` [N, kv heads, D] by
    ``cos``/``sin`` [N, 1, D] (the model's ``apply_rotary_pos_emb``, tokens flattened)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up output [N, 2I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Fused:
    """``rope`` and ``silu_mul`` compiled by ``torch.compile`` (one kernel each instead of
    five to eight passes over the activations), used for batches of at least ``min_tokens``
    tokens on a GPU. Eager these passes are ~25% of a layer's time at 14k tokens of an 8B
    shape (H100: rope 1.03 ms and SiLU x up 1.15 ms next to 8.3 ms of matmuls; compiled 0.15
    and 0.44 ms, ``bench/fastgen_parts.py``). The token dimension is marked dynamic, so one
    compilation serves every batch size, decode steps of many rows included (their graphs
    record the compiled kernels); batches under ``min_tokens`` stay eager, where a compiled
    call's host time outweighs what it saves. A failure to compile switches it off for the
    engine (logged) and the call goes on eagerly."""

    def __init__(self, enabled: bool, min_tokens: int = 2048) -> None:
        self.enabled = enabled
        self.min_tokens = min_tokens
        self.disabled: str | None = None
        self._rope: Any = torch.compile(rope) if enabled else None
        self._silu_mul: Any = torch.compile(silu_mul) if enabled else None

    def _use(self, tokens: int) -> bool:
        return self.enabled and self.disabled is None and tokens >= self.min_tokens

    def _call(self, fn: Any, eager: Any, *args: torch.Tensor) -> Any:
        for a in args:
            torch._dynamo.mark_dynamic(a, 0)
        try:
            return fn(*args)
        except Exception as exc:  # any compiler failure: eager
            if is_oom(exc):
                raise
            self.disabled = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("compiled elementwise switched off", extra={"reason": self.disabled})
            return eager(*args)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._use(q.shape[0]):
            return rope(q, k, cos, sin)
        out: tuple[torch.Tensor, torch.Tensor] = self._call(self._rope, rope, q, k, cos, sin)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not self._use(gate_up.shape[0]):
            return silu_mul(gate_up)
        out: torch.Tensor = self._call(self._silu_mul, silu_mul, gate_up)
        return out


class VarlenAttention:
    """Causal attention over packed rows ``[N, heads, D]`` with torch's variable-length flash
    kernel (CUDA only: no padding, no key/value heads repeated; causal through
    ``window_size`` or ``is_causal``, whichever the installed torch takes). A kernel that
    refuses grouped-query shapes is retried once with the key/value heads repeated."""

    def __init__(self) -> None:
        self.disabled: str | None = None  # why packed capture attends padded
        self.repeat_kv = False  # key/value heads repeated (a torch without native GQA)

    def available(self) -> bool:
        """Whether packed rows can attend here: not switched off, and torch has the kernel."""
        if self.disabled is None:
            try:
                from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            except ImportError as exc:
                self.disabled = f"no varlen_attn: {exc}"
        return self.disabled is None

    def for_lengths(
        self, lengths: torch.Tensor, scale: float, groups: int
    ) -> Callable[..., torch.Tensor | None] | None:
        """Attention for packed rows of ``lengths`` (``groups`` query heads per key/value
        head), or None where torch has no varlen kernel or it was switched off."""
        if not self.available():
            return None
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        options: dict[str, Any] = {"scale": scale}
        if "window_size" in params:
            options["window_size"] = (-1, 0)
        else:
            options["is_causal"] = True
        if "enable_gqa" in params:
            options["enable_gqa"] = groups > 1

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
            if self.disabled is not None:
                return None
            if self.repeat_kv and groups > 1:  # a torch without native GQA
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
            try:
                out: Any = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
            except Exception as exc:  # any kernel refusal: the padded layout
                if groups > 1 and not self.repeat_kv and not is_oom(exc):
                    self.repeat_kv = True
                    return attend(q, k, v)
                if is_oom(exc):
                    raise
                self.disabled = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("varlen attention switched off", extra={"reason": self.disabled})
                return None
            return out if isinstance(out, torch.Tensor) else out[0]

        return attend


class DecodeFlash:
    """Decode attention with torch's flash kernel: one new token per row against a cache laid
    out ``[rows, columns, kv heads, D]``, each row reading only its own keys — from its first
    prompt column (``cu_k``) for as many columns as it has filled (``seqused_k``, updated inside
    the decode graph) — with grouped-query heads native. The masked SDPA it replaces reads
    every column of every row (the request's longest prompt plus all new tokens). CUDA, fp16
    and bf16 only; a torch whose flash op lacks ``seqused_k``, or any kernel refusal, switches
    it off for the engine (logged, shown in ``Info``) and decode attends through SDPA."""

    def __init__(self, enabled: bool) -> None:
        self.disabled: str | None = None if enabled else "not on a CUDA device"
        if enabled:
            op = getattr(torch.ops.aten, "_flash_attention_forward", None)
            if op is None or "seqused_k" not in str(op.default._schema):
                self.disabled = "torch's flash attention op has no seqused_k"

    def usable(self, dtype: torch.dtype) -> bool:
        return self.disabled is None and dtype in (torch.float16, torch.bfloat16)

    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cu: tuple[torch.Tensor, torch.Tensor],
        used: torch.Tensor,
        scale: float,
    ) -> torch.Tensor | None:
        """``q`` [B, heads, D], ``keys``/``values`` [B, L, kv heads, D] (contiguous), ``cu``
        the query offsets [B + 1] and each row's first key [B + 1] (int32, into the rows'
        columns flattened), ``used`` [B] int32 keys per row: [B, heads, D], or None (off)."""
        if self.disabled is not None:
            return None
        rows, length, kv_heads, dim = keys.shape
        try:
            out = torch.ops.aten._flash_attention_forward(
                q,
                keys.view(rows * length, kv_heads, dim),
                values.view(rows * length, kv_heads, dim),
                cu[0],
                cu[1],
                1,
                length,
                0.0,
                False,
                False,
                scale=scale,
                seqused_k=used,
            )[0]
        except Exception as exc:  # any kernel refusal: SDPA over the masked cache
            if is_oom(exc):
                raise
            self.disabled = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("flash decode attention switched off", extra={"reason": self.disabled})
            return None
        result: torch.Tensor = out
        return result
