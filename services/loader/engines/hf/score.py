"""Score for the transformers engine: the log-likelihood of each continuation after its
context. Each context runs once; its KV cache is then repeated for its continuations, which
run in one batched pass (steering follows its row)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from services.loader.cache_arg import cache_kwargs
from services.loader.engine import ContinuationScore, PaddingSide, ScoreInput
from services.loader.engines.hf.core import HFCore
from services.loader.hooks import ForwardState, install_hooks
from services.loader.steering import select_rows

__all__ = ["score"]


def score(
    core: HFCore,
    items: Sequence[ScoreInput],
    *,
    token_logprobs: bool = False,
    padding_side: PaddingSide = "left",
    max_rows: int = 0,
) -> list[list[ContinuationScore]]:
    """Log-likelihood of each continuation; each context is run once and its cache shared."""
    # The context's cache is expanded to every continuation's row, so an item holds
    # (context + continuation) positions per continuation: 102 short continuations of a
    # 300-token judge prompt are 31k cached positions, not 700.
    cost = [
        len(it.context_ids)
        + (len(it.context_ids) + max(len(c) for c in it.continuations)) * len(it.continuations)
        for it in items
    ]
    results: dict[int, list[ContinuationScore]] = {}
    for batch in core._micro_batches(cost, 0, max_rows):

        def run(sub: list[int]) -> list[tuple[int, list[ContinuationScore]]]:
            return score_batch(core, items, sub, token_logprobs, padding_side)

        for index, res in core._adaptive(batch, run):
            results[index] = res
    return [results[i] for i in range(len(items))]


@torch.inference_mode()
def score_batch(
    core: HFCore,
    items: Sequence[ScoreInput],
    rows: list[int],
    keep_tokens: bool,
    side: PaddingSide,
) -> list[tuple[int, list[ContinuationScore]]]:
    """Score one micro-batch of contexts (each with its continuations)."""
    batch = [items[i] for i in rows]
    first_logprobs, cont_hidden, owner_t, conts = _forward(core, batch, side)
    core._count(
        len(batch),
        sum(len(it.context_ids) for it in batch) + sum(len(c) for c in conts),
    )
    per_token, greedy = _token_logprobs(core, first_logprobs, cont_hidden, owner_t, conts)
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


def _forward(
    core: HFCore, batch: Sequence[ScoreInput], side: PaddingSide
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """The steered context pass and continuation pass: log-probs of each context's next
    token [B, V], continuation hidden states [N, W, H], each continuation's context row, and
    the continuations."""
    from transformers import DynamicCache

    dev = core.device
    ctx = core._pad([(it.context_ids, len(it.context_ids)) for it in batch], side)
    plan = core._plan([it.steering for it in batch])
    cache = DynamicCache(config=core.model.config)
    state = ForwardState(ctx.prompt_mask, ctx.response_mask, plan)
    with install_hooks(core.layers, state):
        hidden = core.base(
            input_ids=ctx.input_ids,
            attention_mask=ctx.attention_mask,
            position_ids=ctx.position_ids,
            **cache_kwargs(core.base, cache),
            use_cache=True,
        ).last_hidden_state.to(dev)
        last = torch.tensor(
            [ctx.offsets[b] + len(batch[b].context_ids) - 1 for b in range(len(batch))],
            device=dev,
        )
        first_logprobs = torch.log_softmax(
            core._logits(hidden[torch.arange(len(batch), device=dev), last]), -1
        )
        owner = [b for b, it in enumerate(batch) for _ in it.continuations]
        conts = [c for it in batch for c in it.continuations]
        owner_t = torch.tensor(owner, device=dev)
        cache.batch_select_indices(core.cache_index(owner_t))
        cont_ids, cont_mask = _continuation_tensors(conts, core.pad_id, dev)
        width = cont_ids.shape[1]
        ctx_len = torch.tensor([len(batch[b].context_ids) for b in owner], device=dev)
        positions = ctx_len[:, None] + torch.arange(width, device=dev)[None, :]
        attention = torch.cat([ctx.attention_mask.index_select(0, owner_t), cont_mask], dim=1)
        state.plan = select_rows(plan, owner_t)
        state.prompt = torch.zeros_like(cont_mask, dtype=torch.bool)
        state.response = cont_mask.bool()
        cont_hidden = core.base(
            input_ids=cont_ids,
            attention_mask=attention,
            position_ids=positions,
            **cache_kwargs(core.base, cache),
            use_cache=True,
        ).last_hidden_state.to(dev)
    return first_logprobs, cont_hidden, owner_t, conts


def _continuation_tensors(
    conts: Sequence[list[int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded continuation ids and their mask, on ``device``."""
    width = max(len(c) for c in conts)
    cont_ids = torch.full((len(conts), width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
    for n, c in enumerate(conts):
        cont_ids[n, : len(c)] = torch.tensor(c)
        cont_mask[n, : len(c)] = 1
    return cont_ids.to(device), cont_mask.to(device)


def _token_logprobs(
    core: HFCore,
    first_logprobs: torch.Tensor,
    cont_hidden: torch.Tensor,
    owner_t: torch.Tensor,
    conts: Sequence[list[int]],
) -> tuple[list[list[float]], list[bool]]:
    """Each continuation's per-token log-probs and whether every token was the argmax."""
    dev = core.device
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
        lp_all = torch.log_softmax(core._logits(gathered), -1)
        tgt = torch.tensor(targets, device=dev)
        lps = lp_all.gather(1, tgt[:, None]).squeeze(1).tolist()
        hits = (lp_all.argmax(-1) == tgt).tolist()
        for k, n in enumerate(sel_rows):
            per_token[n].append(lps[k])
            greedy[n] = greedy[n] and bool(hits[k])
    return per_token, greedy
