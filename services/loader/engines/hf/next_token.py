"""NextToken for the transformers engine: the distribution over the token after each item's
prompt (+ response) under its steering: top-k log-probs, entropy, logit statistics and the
requested tokens' logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.loader.engine import EngineItem, NextTokenResult, PaddingSide
from services.loader.engines.hf.core import HFCore
from services.loader.hooks import ForwardState, install_hooks

__all__ = ["next_token"]


def next_token(
    core: HFCore,
    items: Sequence[EngineItem],
    *,
    top_k: int,
    token_ids: Sequence[int],
    padding_side: PaddingSide = "left",
    max_rows: int = 0,
) -> list[NextTokenResult]:
    """Distribution over the token after each item's prompt (+ response)."""
    results: dict[int, NextTokenResult] = {}
    for batch in core._micro_batches([it.length for it in items], 0, max_rows):

        def run(sub: list[int]) -> list[tuple[int, NextTokenResult]]:
            return _next_token_batch(core, items, sub, top_k, token_ids, padding_side)

        for index, res in core._adaptive(batch, run):
            results[index] = res
    return [results[i] for i in range(len(items))]


@torch.inference_mode()
def _next_token_batch(
    core: HFCore,
    items: Sequence[EngineItem],
    rows: list[int],
    top_k: int,
    token_ids: Sequence[int],
    side: PaddingSide,
) -> list[tuple[int, NextTokenResult]]:
    batch = [items[i] for i in rows]
    padded = core._pad(
        [(it.prompt_ids + it.response_ids, len(it.prompt_ids)) for it in batch], side
    )
    state = ForwardState(
        padded.prompt_mask, padded.response_mask, core._plan([it.steering for it in batch])
    )
    with install_hooks(core.layers, state):
        hidden = core.base(
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            position_ids=padded.position_ids,
            use_cache=False,
        ).last_hidden_state.to(core.device)
    core._count(len(batch), sum(it.length for it in batch))
    last = torch.tensor(
        [padded.offsets[b] + batch[b].length - 1 for b in range(len(batch))], device=core.device
    )
    logits = core._logits(hidden[torch.arange(len(batch), device=core.device), last])
    return [(rows[b], _distribution(core, logits[b], top_k, token_ids)) for b in range(len(batch))]


def _distribution(
    core: HFCore, logits: torch.Tensor, top_k: int, token_ids: Sequence[int]
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
            (int(t), core.token_string(int(t)), float(lp))
            for t, lp in zip(top_ids.tolist(), top_lp.tolist(), strict=True)
        ],
        stats=stats,
        requested_ids=requested,
        requested_logits=logits.index_select(0, index).tolist() if requested else [],
        requested_logprobs=logprobs.index_select(0, index).tolist() if requested else [],
    )
