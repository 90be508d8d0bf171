"""Decode attention as one Triton kernel: each (row, key/value head) program reads its row's
own filled keys once and attends all the query heads of that key/value head with them.

Why: at a sweep's decode step (1 100 rows x ~72 keys, Llama-3.1-8B shape) torch's flash
kernel launched 8 800 blocks of 128 query rows each for 4 real ones and took ~0.3 ms a layer
(4.8 ms of a 19.8 ms step) for ~324 MB of keys and values that an H100 reads in ~97 us. Here a
program holds its key/value head's query heads as a 16-row tile (``tl.dot``'s minimum), loops
over the row's keys in blocks of 64 with an online softmax in float32, and writes its heads'
outputs: the keys and values are read exactly once, nothing is padded to 128.

The default decode attention (setting ``decode_kernel``). On an H100 at that sweep's step
(1 100 rows, cache width 128) it takes 0.23 ms a layer where the flash kernel takes 0.39 ms,
against a floor of 0.17 ms for reading the whole cache (``bench/fastgen_parts.py
--decode-attention-only``; 16 other launch settings took 0.21-0.29 ms, close to run-to-run
noise, so the defaults stayed); the 8B-shaped sweep takes 1.06 s instead of 1.19 s.

Same contract as ``fastgen_kernels.DecodeFlash`` (the cache ``[rows, columns, kv heads, D]``
flattened to tokens, row ``b`` attending keys ``[cu_k[b], cu_k[b] + used[b])``), and the same
fallbacks: a GPU without Triton, a compile or launch error, or a first answer that disagrees
with a plain-torch reference switches it off for the engine (logged, shown in ``Info``) and
the flash kernel attends instead; a head size that is not a power of two (or under 16) is
declined call by call, as is float32 on a GPU (``tl.dot`` would round it to TF32). On a CPU
it runs only in Triton's interpreter (the tests), never in serving.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from services.common.logging import get_logger
from services.loader.transfer import is_oom

__all__ = ["DecodeTriton", "reference_decode"]

log = get_logger(__name__)

_LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per iteration
NUM_WARPS = 4
# The first call's answer is checked against ``reference_decode`` on this many rows (the first
# ones and those with the most keys, so several key blocks are checked where any row has
# them); a relative error above the tolerance (bf16 output rounding is ~4e-3) switches the
# kernel off.
_CHECK_ROWS = 4
_CHECK_TOLERANCE = 2e-2

_kernels: dict[bool, Any] = {}  # built kernels, by interpreted (TRITON_INTERPRET=1) or not


def _build_kernel() -> Any:
    """The jitted kernel (built on first use: importing Triton costs ~1 s and a CPU server
    never needs it; under ``TRITON_INTERPRET=1`` this builds the interpreted one)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        start_ptr,
        used_ptr,
        scale,  # softmax scale x log2(e): exp2 below
        stride_qb,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ob,
        stride_oh,
        GROUPS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        start = tl.load(start_ptr + row).to(tl.int64)
        used = tl.load(used_ptr + row)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        live = g < GROUPS
        heads = kv_head * GROUPS + g
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=live[:, None],
            other=0.0,
        )
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for first in range(0, used, BLOCK_N):
            cols = first + tl.arange(0, BLOCK_N)
            inside = cols < used
            tok = start + cols
            k = tl.load(
                k_ptr + tok[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(
                v_ptr + tok[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / total[:, None]
        tl.store(
            o_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=live[:, None],
        )

    return decode_attention


def kernel() -> Any:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted not in _kernels:
        _kernels[interpreted] = _build_kernel()
    return _kernels[interpreted]


def reference_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    used: torch.Tensor,
    scale: float,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The contract in plain torch, float32, row by row (``rows``: a subset, default all):
    ``q`` [B, heads, D], ``keys``/``values`` [B, L, kv heads, D], ``starts`` [>= B] each row's
    first key in the flattened cache, ``used`` [B] its keys. Returns [len(rows), heads, D]."""
    batch, length, kv_heads, dim = keys.shape
    flat_k, flat_v = (t.reshape(batch * length, kv_heads, dim) for t in (keys, values))
    groups = q.shape[1] // kv_heads
    out = []
    for b in rows if rows is not None else range(q.shape[0]):
        first, n = int(starts[b]), int(used[b])
        k = flat_k[first : first + n].float().repeat_interleave(groups, dim=1)  # [n, heads, D]
        v = flat_v[first : first + n].float().repeat_interleave(groups, dim=1)
        weights = (torch.einsum("hd,nhd->hn", q[b].float(), k) * scale).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(out)


class DecodeTriton:
    """The kernel behind ``DecodeFlash``'s interface; see the module docstring.

    ``enabled``: on a CUDA device (the engine's choice), or in Triton's interpreter on a CPU
    (tests, with ``TRITON_INTERPRET=1`` set before the first kernel is built)."""

    def __init__(
        self,
        enabled: bool,
        why_not: str = "not on a CUDA device",
        *,
        block_n: int = BLOCK_N,
        num_warps: int = NUM_WARPS,
        num_stages: int | None = None,
    ) -> None:
        """``block_n``/``num_warps``/``num_stages``: the launch settings (the benchmark tries
        several; ``num_stages`` None leaves Triton's default)."""
        self.disabled: str | None = None if enabled else why_not
        self.block_n = block_n
        self.launch: dict[str, int] = {"num_warps": num_warps}
        if num_stages is not None:
            self.launch["num_stages"] = num_stages
        self.checked = False
        # float32 only where exact (the interpreter): on a GPU tl.dot rounds it to TF32.
        self.float32 = os.environ.get("TRITON_INTERPRET") == "1"
        if self.disabled is None:
            try:
                kernel()
            except Exception as exc:  # no Triton, or one that cannot build the kernel
                self.disabled = f"{type(exc).__name__}: {exc}"[:300]

    def usable(self, dtype: torch.dtype, head_dim: int | None = None) -> bool:
        if self.disabled is not None:
            return False
        shaped = head_dim is None or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)
        return shaped and (
            dtype in (torch.float16, torch.bfloat16) or (self.float32 and dtype == torch.float32)
        )

    def _off(self, reason: str) -> None:
        self.disabled = reason[:300]
        log.warning("Triton decode attention switched off", extra={"reason": self.disabled})

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
        the query offsets and each row's first key (int32, [B + 1]), ``used`` [B] int32:
        [B, heads, D], or None (off: the caller attends another way)."""
        if self.disabled is not None:
            return None
        rows, heads, dim = q.shape
        kv_heads = keys.shape[2]
        if not self.usable(q.dtype, dim) or heads % kv_heads:
            return None
        groups = heads // kv_heads
        if not self.checked and q.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # the first answer is checked eagerly, never inside a graph recording
        flat_k = keys.view(-1, kv_heads, dim)
        flat_v = values.view(-1, kv_heads, dim)
        out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
        try:
            kernel()[(rows, kv_heads)](
                q,
                flat_k,
                flat_v,
                out,
                cu[1],
                used,
                scale * _LOG2E,
                q.stride(0),
                q.stride(1),
                flat_k.stride(0),
                flat_k.stride(1),
                flat_v.stride(0),
                flat_v.stride(1),
                out.stride(0),
                out.stride(1),
                GROUPS=groups,
                BLOCK_G=max(16, 1 << math.ceil(math.log2(groups))),
                BLOCK_N=self.block_n,
                HEAD_DIM=dim,
                **self.launch,
            )
        except Exception as exc:  # a compile or launch refusal: the flash kernel attends
            if is_oom(exc):
                raise
            self._off(f"{type(exc).__name__}: {exc}")
            return None
        if not self.checked:
            self.checked = True
            longest = used.topk(min(rows, _CHECK_ROWS // 2)).indices.tolist()
            sample = sorted({*range(min(rows, _CHECK_ROWS // 2)), *longest})
            want = reference_decode(q, keys, values, cu[1], used, scale, sample)
            error = float((out[sample].float() - want).abs().max())
            size = float(want.abs().max()) or 1.0
            if not error <= _CHECK_TOLERANCE * size:  # also NaN
                self._off(f"first answer off by {error:.3g} (max |out| {size:.3g})")
                return None
        return out
