"""Micro-batching for the transformers engine: rows sorted by length and cut by rows and
padded tokens, and padded device tensors whose position ids make left and right padding give
the same numbers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.loader.capture_graphs import pad_arrays
from services.loader.engine import PaddingSide
from services.loader.transfer import to_device

__all__ = ["Padded", "micro_batches", "pad_batch"]


@dataclass
class Padded:
    """One padded micro-batch on the device; ``offsets`` is each row's first real column."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    offsets: list[int]


def micro_batches(
    lengths: Sequence[int],
    extra: int,
    *,
    max_rows: int,
    max_tokens: int,
    split_tokens: int = 0,
) -> list[list[int]]:
    """Rows sorted longest first, split greedily by rows (``max_rows``) and padded tokens
    (``max_tokens``, counting ``extra`` tokens per row); with ``split_tokens``, a batch that
    holds that many padded tokens also ends where the next row would pad it by more than 1/16."""
    sizes = np.asarray(lengths, dtype=np.int64)
    # Stable: equal lengths keep request order (results must not depend on ties).
    order = np.argsort(-sizes, kind="stable").tolist()
    padded = (int(sizes.max()) + extra) * len(order) if order else 0
    fits = len(order) <= max_rows and padded <= max_tokens
    if fits and (not split_tokens or padded <= split_tokens):
        return [order] if order else []
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = lengths[i] + extra
        grown = max(longest, size)
        wasteful = (
            split_tokens > 0 and longest * len(current) >= split_tokens and size * 16 < longest * 15
        )
        if current and (
            len(current) + 1 > max_rows or grown * (len(current) + 1) > max_tokens or wasteful
        ):
            batches.append(current)
            current, grown = [], size
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


def pad_batch(
    seqs: Sequence[tuple[list[int], int]], side: PaddingSide, pad_id: int, device: torch.device
) -> Padded:
    """Pad (ids, prompt_len) rows; prompt/response masks exclude padding (``pad_arrays``)."""
    input_ids, positions, starts, attention, prompt, response = pad_arrays(seqs, side, pad_id)
    # Two host-to-device copies instead of five (each is a host-side wait on a GPU).
    ints = to_device(torch.from_numpy(np.stack([input_ids, attention, positions])), device)
    masks = to_device(torch.from_numpy(np.stack([prompt, response])), device)
    return Padded(ints[0], ints[1], ints[2], masks[0], masks[1], [int(x) for x in starts])
