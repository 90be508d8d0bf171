"""Capture replayed as a CUDA graph: a small model's forward on a GPU is bound by kernel
launches (SmolLM2-135M: ~1 800 launches, 27 ms for 80 rows whose arithmetic takes ~8 ms), so
recording the hooked forward once per shape and replaying it removes the launch cost.

Shapes are bucketed (rows and padded width rounded up a ladder that wastes at most 1/16 from 64 on) so
that batches of similar size share a graph. Everything a graph reads lives in one static
int64 buffer ``[4, rows, width]`` (token ids, attention, positions, selected positions) that
is overwritten before each replay; the 4-D attention mask, the reduction's weights and the
reduction itself are computed inside the graph. Extra rows of a bucket are single-token dummies
that attend to themselves only, so nothing in a graph ever attends to nothing (a NaN there
would poison the reduction through 0 * NaN).

A bucket is recorded the second time it is seen (a one-off shape costs no recording), at most
``max_graphs`` graphs are kept (least recently used evicted; each holds its own memory pool)
and only batches of at most ``max_tokens`` padded tokens are graphed: past that a forward is
bound by arithmetic and a graph gains little. Unsteered ``mean``/``last`` captures only:
per-row steering and ``none`` (a data-dependent number of selected tokens) run eagerly.
LLM.int8() is never graphed: its outlier decomposition depends on the data. Any failure to
record switches graphs off for the engine (logged) and the call runs eagerly.

On a CPU the same static-shape path can run without a graph (``use_graphs=False``); the tests
use it to check that bucketing, dummy rows, the in-graph mask and reduction give the eager
path's numbers.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from services.common.logging import get_logger
from services.loader.hooks import CaptureSink, ForwardState, capture_forward, reduction_inputs
from services.loader.steering import SteeringPlan
from services.loader.transfer import is_oom

__all__ = ["CaptureForward", "CaptureGraphs", "GraphKey", "bucket", "pad_arrays"]

log = get_logger(__name__)
Side = Literal["left", "right"]
CaptureForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ForwardState], torch.Tensor]


def bucket(n: int) -> int:
    """``n`` rounded up to a multiple of ``max(4, 2**(bits(n) - 5))``: at most 1/16 more from
    64 on (padded tokens are computed: on the H200, 320 rows of 65 tokens padded to 72 cost
    6.5% more GPU time than the forward of 65)."""
    step = max(4, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


def pad_arrays(
    seqs: Sequence[tuple[list[int], int]],
    side: Side,
    pad_id: int,
    *,
    rows: int = 0,
    width: int = 0,
) -> tuple[np.ndarray, ...]:
    """Whole-array padding of (ids, prompt_len) rows to ``[rows, width]`` (at least the data's).

    Returns int64 ``input_ids``, ``positions``, ``starts`` (each row's first column) and bool
    ``attention``, ``prompt``, ``response`` masks, padding excluded. Rows past the data are
    empty. No per-row tensor operations: at hundreds of rows those dominate a small model's
    forward on a GPU.
    """
    n = len(seqs)
    lengths = np.zeros(max(rows, n), dtype=np.int64)
    lengths[:n] = np.fromiter((len(ids) for ids, _ in seqs), dtype=np.int64, count=n)
    prompt_lens = np.zeros_like(lengths)
    prompt_lens[:n] = np.fromiter((p for _, p in seqs), dtype=np.int64, count=n)
    width = max(width, int(lengths.max()) if n else 0)
    starts = width - lengths if side == "left" else np.zeros_like(lengths)
    rel = np.arange(width, dtype=np.int64)[None, :] - starts[:, None]
    attention = (rel >= 0) & (rel < lengths[:, None])
    prompt = attention & (rel < prompt_lens[:, None])
    response = attention & ~prompt
    input_ids = np.full(attention.shape, pad_id, dtype=np.int64)
    # Row-major order of the True cells is each row's tokens in order.
    input_ids[attention] = np.fromiter(
        itertools.chain.from_iterable(ids for ids, _ in seqs),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    positions = np.where(attention, rel, 0)
    return input_ids, positions, starts, attention, prompt, response


@dataclass(frozen=True)
class GraphKey:
    rows: int
    width: int
    layers: tuple[int, ...]
    reduction: str


@dataclass
class _Entry:
    static: torch.Tensor  # [4, rows, width] int64: ids, attention, positions, select
    output: torch.Tensor  # [rows, layers, hidden], written by each replay
    graph: Any = None  # torch.cuda.CUDAGraph, None when run without graphs


class CaptureGraphs:
    """Static-shape capture, recorded as CUDA graphs on a GPU; see the module docstring."""

    def __init__(
        self,
        base: nn.Module,
        layers: nn.ModuleList,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pad_id: int,
        attn_implementation: str,
        max_graphs: int,
        max_tokens: int,
        fuse_bytes: Callable[[], int],
        use_graphs: bool,
        disabled: str | None = None,
        record_after: int = 2,
        forward: CaptureForward | None = None,
    ) -> None:
        self.base = base
        self.layers = layers
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.attn_implementation = attn_implementation
        self.max_graphs = max_graphs
        self.max_tokens = max_tokens
        self.fuse_bytes = fuse_bytes
        self.use_graphs = use_graphs
        self.record_after = record_after
        # The capture forward (ids, attention [B, T] bool, positions, state): the engine's
        # layer loop where it has one (fastgen), else the hooked transformers forward.
        self.forward = forward
        # Why graphs are off for this engine (None: on where max_graphs > 0).
        self.disabled = disabled
        if attn_implementation not in ("sdpa", "eager"):
            self.disabled = f"attention implementation {attn_implementation!r}"
        self._entries: collections.OrderedDict[GraphKey, _Entry] = collections.OrderedDict()
        self._seen: collections.Counter[GraphKey] = collections.Counter()
        self.recorded = 0  # buckets recorded
        self.replays = 0  # calls served by a recorded bucket (a graph replay on a GPU)

    def clear(self) -> None:
        """Drop every graph and its memory pool (out of memory, or shutting down)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, rows: int, width: int, layers: Sequence[int], reduction: str) -> GraphKey | None:
        """The bucket of a batch, or None when this batch is not graphed."""
        if self.disabled or self.max_graphs <= 0 or reduction not in ("mean", "last"):
            return None
        key = GraphKey(bucket(rows), bucket(width), tuple(layers), reduction)
        if key.rows * key.width > self.max_tokens:
            return None
        return key

    def run(
        self,
        key: GraphKey,
        seqs: Sequence[tuple[list[int], int]],
        spans: np.ndarray,
        side: Side,
    ) -> torch.Tensor | None:
        """``[len(seqs), layers, hidden]`` on the device for the batch (read it before the next
        call: it is the graph's output buffer), or None when it should run eagerly."""
        entry = self._entries.get(key)
        if entry is None:
            self._seen[key] += 1
            if self._seen[key] < self.record_after:
                if len(self._seen) > 4096:  # forget one-off shapes of a long-running server
                    self._seen = collections.Counter({k: c for k, c in self._seen.items() if c > 1})
                return None
        host = self._host_buffer(key, seqs, spans, side)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.static.copy_(host, non_blocking=True)
            if entry.graph is not None:
                entry.graph.replay()
            else:
                entry.output = self._body(entry.static, key)
            self.replays += 1
        else:
            entry = self._record(key, host)
            if entry is None:
                return None
        return entry.output[: len(seqs)]

    # ------------------------------------------------------------------ internals
    def _host_buffer(
        self,
        key: GraphKey,
        seqs: Sequence[tuple[list[int], int]],
        spans: np.ndarray,
        side: Side,
    ) -> torch.Tensor:
        ids, positions, starts, attention, _, _ = pad_arrays(
            seqs, side, self.pad_id, rows=key.rows, width=key.width
        )
        n = len(seqs)
        rel = np.arange(key.width, dtype=np.int64)[None, :] - starts[:n, None]
        select = np.zeros_like(attention)
        select[:n] = (rel >= spans[:, :1]) & (rel < spans[:, 1:])
        host = torch.from_numpy(np.stack([ids, attention, positions, select]))
        return host.pin_memory() if self.device.type == "cuda" else host

    def _mask(self, attention: torch.Tensor, width: int) -> torch.Tensor:
        """The 4-D mask: causal over real keys, and every query attends to itself (padding and
        dummy rows included, so no softmax is over nothing)."""
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=self.device)
        allowed = ((causal[None] & attention[:, None, :]) | eye[None])[:, None]
        if self.attn_implementation == "sdpa":
            return allowed
        neg = torch.finfo(self.dtype).min
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.full_like(zero, neg))

    def _body(self, static: torch.Tensor, key: GraphKey) -> torch.Tensor:
        """The hooked forward on ``static`` (recorded into a graph on a GPU)."""
        attention, select = static[1].bool(), static[3].bool()
        sink = CaptureSink(
            frozenset(key.layers),
            key.reduction,  # type: ignore[arg-type]
            reduction_inputs(select, key.reduction),  # type: ignore[arg-type]
            stop_after=key.layers[-1],
            fuse_bytes=self.fuse_bytes(),
        )
        if self.forward is not None:
            state = ForwardState(attention, attention, SteeringPlan({}), sink)
            return self.forward(static[0], attention, static[2], state)
        return capture_forward(
            self.base,
            self.layers,
            ForwardState(attention, attention, SteeringPlan({}), sink),
            input_ids=static[0],
            attention_mask=self._mask(attention, key.width),
            position_ids=static[2],
        )

    def _record(self, key: GraphKey, host: torch.Tensor) -> _Entry | None:
        static = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        static.copy_(host, non_blocking=True)
        if not self.use_graphs:
            entry = _Entry(static, self._body(static, key))
        else:
            try:
                entry = self._record_graph(key, static)
            except Exception as exc:
                if is_oom(exc):  # the engine frees memory (this cache included) and halves
                    raise
                self.disabled = f"{type(exc).__name__}: {exc}"
                self.clear()
                log.warning("capture graphs switched off", extra={"reason": self.disabled})
                return None
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        self.recorded += 1
        return entry

    def _record_graph(self, key: GraphKey, static: torch.Tensor) -> _Entry:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture stream (allocator, cuBLAS)
            self._body(static, key)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self._body(static, key)
        graph.replay()  # recording runs nothing: compute this call's result
        return _Entry(static, output, graph)
