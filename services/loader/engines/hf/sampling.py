"""Choosing the next token (greedy, or temperature/top-k/top-p with per-row counter-based
Gumbel noise, so a row's sample depends only on its seed and the step) and recording the
chosen token's log-prob and the top alternatives."""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.loader.engine import GenParams, StepLogprob

__all__ = ["M32", "record_logprobs", "sample"]

M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer mixer on int64 tensors (products stay below 2**63).
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    return x ^ (x >> 16)


def sample(logits: torch.Tensor, params: GenParams, keys: torch.Tensor, step: int) -> torch.Tensor:
    """The next token of each row; ``keys`` are the rows' 32-bit seeds."""
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
    step_keys = _hash32((keys + step * 0x9E3779B1) & M32)
    bits = _hash32(_hash32(step_keys[:, None] ^ vocab[None, :]) ^ 0x27D4EB2F)
    uniform = (bits.double() + 0.5) / 4294967296.0
    gumbel = -torch.log(-torch.log(uniform)).float()
    return (scaled + gumbel).argmax(dim=-1)


def record_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    active: torch.Tensor,
    top: int,
    sink: list[list[StepLogprob]],
    finished: list[bool],
    token_string: Callable[[int], str],
) -> None:
    """Append each live row's step (``active[j]`` is the result row of batch row ``j``)."""
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
                (int(t), token_string(int(t)), float(lp))
                for t, lp in zip(top_ids_l[j], top_lp_l[j], strict=True)
            )
        sink[row].append(StepLogprob((tid, token_string(tid), float(chosen[j])), alts))
