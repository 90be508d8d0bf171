"""Capture for the transformers engine: the residual stream after chosen layers at a position
of each item, reduced (mean, last) or per token (none), streamed in chunks of items. A batch
without steering replays a recorded capture graph where one fits (``capture_graphs``); the
rest run eagerly through fastgen's layer loop or transformers' forward with capture hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from services.loader.engine import CaptureResult, EngineItem, PaddingSide, Reduction
from services.loader.engines.hf.core import HFCore
from services.loader.hooks import CaptureSink, ForwardState, capture_forward, reduction_inputs
from services.loader.positions import Position
from services.loader.steering import SteeringPlan
from services.loader.transfer import to_host

__all__ = ["capture"]


def capture(
    core: HFCore,
    items: Sequence[EngineItem],
    layers: Sequence[int],
    position: Position,
    reduction: Reduction,
    *,
    padding_side: PaddingSide = "left",
    max_rows: int = 0,
    chunk_items: int = 64,
) -> Iterator[list[CaptureResult]]:
    """Yield results in request order, ``chunk_items`` at a time (items validated by
    ``Engine.capture``: ``position`` selects tokens of each)."""
    layer_list = sorted(set(layers))
    chunk = max(1, chunk_items)
    # Windows only for reductions whose results are a row per item (mean, last): per-token
    # results ("none") are what the chunk size bounds (~16 MB a message, one item at the 8B
    # shape), and a window of them would hold gigabytes.
    window_tokens = core.capture_window_tokens if reduction != "none" else 0

    def run(sub: list[int]) -> list[CaptureResult]:
        batch = [items[i] for i in sub]
        return _capture_batch(core, batch, sub, layer_list, position, reduction, padding_side)

    for window in _windows(items, chunk, window_tokens):
        results: dict[int, CaptureResult] = {}
        # Where windows are on (a GPU), steered rows go apart: a batch with any steering runs
        # the padded hooked forward, and one steered item must not take a window's unsteered
        # rows (packed, graphed) with it.
        groups = [window]
        if window_tokens > 0:
            steered = [i for i in window if items[i].steering]
            groups = [g for g in ([i for i in window if not items[i].steering], steered) if g]
        for group in groups:
            lengths = [items[i].length for i in group]
            unpadded = _unpadded(core, [items[i] for i in group], layer_list, reduction)
            split = 0 if unpadded else core.capture_split_tokens
            for batch in core._micro_batches(lengths, 0, max_rows, split):
                for res in core._adaptive([group[j] for j in batch], run):
                    results[res.index] = res
        for start in range(0, len(window), chunk):
            yield [results.pop(i) for i in window[start : start + chunk]]


def _unpadded(
    core: HFCore, items: Sequence[EngineItem], layers: Sequence[int], reduction: Reduction
) -> bool:
    """Whether these items' capture as one batch computes no padding at all: fastgen's packed
    capture of unsteered rows with varlen attention (a GPU), reducing a mean straight from
    the packed layout, and too large for a capture graph (which replays a padded batch).
    Splitting such a batch against padding waste would only shrink its matmuls. Elsewhere
    (a CPU's packed capture attends the padded layout; "last" and "none" are recorded
    through it; graphs pad) batches are split as the padded forward's are."""
    fast = core.fast
    if (
        fast is None
        or core.device.type != "cuda"
        or reduction != "mean"
        or not fast.varlen.available()
        or any(it.steering for it in items)
    ):
        return False
    width = max((it.length for it in items), default=0)
    return core.graphs.key(len(items), width, layers, reduction) is None


def _windows(items: Sequence[EngineItem], chunk: int, tokens: int) -> Iterator[list[int]]:
    """The items in windows of whole chunks: a chunk (the streamed message's size) of short
    items is computed with the next ones until the window holds ``tokens`` tokens, so that a
    forward's matmuls are not as small as one message (at Llama-3.1-8B's shape the default
    chunk is 32-64 items, ~5-10k tokens, and the H100 capture bench's 80 items ran as two
    forwards, the second of 16 rows). A window is at least one chunk; ``tokens`` 0 makes
    every chunk its own."""
    start = 0
    while start < len(items):
        end = min(len(items), start + chunk)
        held = sum(items[i].length for i in range(start, end))
        while end < len(items) and tokens > 0:
            more = min(len(items), end + chunk)
            extra = sum(items[i].length for i in range(end, more))
            if held + extra > tokens:
                break
            end, held = more, held + extra
        yield list(range(start, end))
        start = end


@torch.inference_mode()
def _capture_batch(
    core: HFCore,
    batch: Sequence[EngineItem],
    indices: Sequence[int],
    layers: list[int],
    position: Position,
    reduction: Reduction,
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
    plan = core._plan([it.steering for it in batch])
    graph_key = (
        core.graphs.key(len(batch), max(it.length for it in batch), layers, reduction)
        if plan.empty
        else None
    )
    result: torch.Tensor | None = None
    if graph_key is not None:
        result = core.graphs.run(graph_key, seqs, spans, side)
    if result is None:
        result = _capture_eager(core, seqs, spans, plan, layers, reduction, side)
    core._count(len(batch), sum(it.length for it in batch))
    out: list[CaptureResult] = []
    stacked = to_host(result, pinned=core.pinned_results)
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
    core: HFCore,
    seqs: list[tuple[list[int], int]],
    spans: np.ndarray,
    plan: SteeringPlan,
    layers: list[int],
    reduction: Reduction,
    side: PaddingSide,
) -> torch.Tensor:
    """The hooked forward of one micro-batch: [B, L, H] (mean, last) or [N, L, H] (none)."""
    padded = core._pad(seqs, side)
    spans = spans + np.asarray(padded.offsets, dtype=np.int64)[:, None]
    col = np.arange(padded.input_ids.shape[1], dtype=np.int64)[None, :]
    select = torch.from_numpy((col >= spans[:, :1]) & (col < spans[:, 1:]))
    sink = CaptureSink(
        frozenset(layers),
        reduction,
        reduction_inputs(select, reduction).to(core.device),
        stop_after=layers[-1],
        fuse_bytes=core._capture_fuse_bytes(),
    )
    state = ForwardState(padded.prompt_mask, padded.response_mask, plan, sink)
    if core.fast is not None and plan.empty:
        return core.fast.capture_packed(
            padded.input_ids, padded.attention_mask.bool(), padded.position_ids, state
        )
    if core.fast is not None:
        return core.fast.capture_forward(
            padded.input_ids, padded.attention_mask.bool(), padded.position_ids, state
        )
    return capture_forward(
        core.base,
        core.layers,
        state,
        input_ids=padded.input_ids,
        attention_mask=padded.attention_mask,
        position_ids=padded.position_ids,
    )
