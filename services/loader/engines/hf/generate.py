"""Generation for the transformers engine: micro-batches of left-padded prompts decoded
through fastgen's layer loop (prefix-shared prefill, CUDA-graph decode steps on a GPU) where
the model allows, else through transformers' forward with a KV cache; per-row steering,
seeds, stop strings and log-probs on both paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.loader.cache_arg import cache_kwargs
from services.loader.engine import EngineItem, GenParams, GenResult, StepLogprob
from services.loader.engines.hf.core import HFCore
from services.loader.engines.hf.sampling import M32, record_logprobs, sample
from services.loader.hooks import ForwardState, install_hooks
from services.loader.steering import first_prompt_layer, select_rows

__all__ = ["generate"]


def generate(
    core: HFCore, items: Sequence[EngineItem], params: GenParams, *, max_rows: int = 0
) -> list[GenResult]:
    """Generate for every item (left padding; per-row seeds make samples batch-independent)."""
    results: dict[int, GenResult] = {}
    for batch in core._micro_batches(
        [len(it.prompt_ids) for it in items], params.max_new_tokens, max_rows
    ):

        def run(sub: list[int]) -> list[tuple[int, GenResult]]:
            if core.fast is not None and core.cache_mode == "auto":
                return generate_fast(core, items, sub, params)
            return generate_cached(core, items, sub, params)

        for index, res in core._adaptive(batch, run):
            results[index] = res
    return [results[i] for i in range(len(items))]


@dataclass
class _Outputs:
    """What each row of a micro-batch has generated so far."""

    count: int
    generated: list[list[int]] = field(init=False)
    step_logprobs: list[list[StepLogprob]] = field(init=False)
    finish: list[str] = field(init=False)
    finished: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.generated = [[] for _ in range(self.count)]
        self.step_logprobs = [[] for _ in range(self.count)]
        self.finish = ["length"] * self.count
        self.finished = [False] * self.count


class _CachedDecode:
    """transformers' forward over one micro-batch with a KV cache and the steering hooks'
    state; ``active`` maps each live cache row to its batch row."""

    def __init__(self, core: HFCore, batch: Sequence[EngineItem], max_new_tokens: int) -> None:
        from transformers import DynamicCache, StaticCache

        self.core = core
        dev = core.device
        count = len(batch)
        self.padded = core._pad([(it.prompt_ids, len(it.prompt_ids)) for it in batch], "left")
        width = self.padded.input_ids.shape[1]
        # A static cache writes in place (no per-step concatenation of the whole cache, which
        # dominates small models on GPUs); a dynamic cache lets finished rows leave the batch,
        # which pays off when compute, not launches, is the bottleneck (CPUs).
        self.static = core.cache_mode == "static" or (
            core.cache_mode == "auto" and dev.type == "cuda"
        )
        config = core.model.config
        self.cache: Any = (
            StaticCache(config=config, max_cache_len=width + max_new_tokens)
            if self.static
            else DynamicCache(config=config)
        )
        plan = core._plan([it.steering for it in batch])
        self.state = ForwardState(self.padded.prompt_mask, self.padded.response_mask, plan)
        self.keys = torch.tensor([it.seed & M32 for it in batch], dtype=torch.int64, device=dev)
        self.active = torch.arange(count, device=dev)
        if self.static:
            self.attention = torch.zeros(
                (count, width + max_new_tokens), dtype=torch.long, device=dev
            )
            self.attention[:, :width] = self.padded.attention_mask
        else:
            self.attention = self.padded.attention_mask
        self.length = width
        self.next_pos = self.padded.position_ids[:, -1] + 1

    def _last_logits(self, out: Any) -> torch.Tensor:
        logits: torch.Tensor = out.logits[:, -1, :].float().to(self.core.device)
        if self.core.softcap:
            logits = torch.tanh(logits / self.core.softcap) * self.core.softcap
        return logits

    def prefill(self) -> torch.Tensor:
        out = self.core.model(
            input_ids=self.padded.input_ids,
            attention_mask=self.attention[:, : self.length],
            position_ids=self.padded.position_ids,
            **cache_kwargs(self.core.model, self.cache),
            use_cache=True,
            logits_to_keep=1,
        )
        return self._last_logits(out)

    def keep(self, keep: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from a dynamic cache (a static one keeps them); the live tokens."""
        if self.static or len(keep) == self.active.shape[0]:
            return tokens
        keep_t = torch.tensor(keep, device=self.core.device)
        self.cache.batch_select_indices(self.core.cache_index(keep_t))
        self.active = self.active.index_select(0, keep_t)
        self.attention = self.attention.index_select(0, keep_t)
        self.next_pos = self.next_pos.index_select(0, keep_t)
        self.keys = self.keys.index_select(0, keep_t)
        self.state.plan = select_rows(self.state.plan, keep_t)
        return tokens.index_select(0, keep_t)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per live row; the next logits."""
        dev = self.core.device
        live = tokens.shape[0]
        if self.static:
            self.attention[:, self.length] = 1
        else:
            ones = torch.ones((live, 1), dtype=self.attention.dtype, device=dev)
            self.attention = torch.cat([self.attention, ones], 1)
        self.length += 1
        self.state.prompt = torch.zeros((live, 1), dtype=torch.bool, device=dev)
        self.state.response = torch.ones((live, 1), dtype=torch.bool, device=dev)
        out = self.core.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention[:, : self.length],
            position_ids=self.next_pos[:, None],
            **cache_kwargs(self.core.model, self.cache),
            use_cache=True,
        )
        self.next_pos = self.next_pos + 1
        return self._last_logits(out)


def _accept(
    core: HFCore,
    out: _Outputs,
    tokens: list[int],
    active: list[int],
    hit_eos: list[bool] | None,
    params: GenParams,
    stop_window: int,
) -> None:
    """Append each live row's token; mark rows that hit end-of-turn or a stop string."""
    for j, row in enumerate(active):
        if out.finished[row]:
            continue
        out.generated[row].append(int(tokens[j]))
        if hit_eos is not None and hit_eos[j]:
            out.finish[row] = "stop"
            out.finished[row] = True
        elif params.stop:
            tail = core.tokenizer.decode(out.generated[row][-stop_window:])
            if any(s in tail for s in params.stop):
                out.finish[row] = "stop"
                out.finished[row] = True


@torch.inference_mode()
def generate_cached(
    core: HFCore, items: Sequence[EngineItem], rows: list[int], params: GenParams
) -> list[tuple[int, GenResult]]:
    """Generate one micro-batch through transformers' forward (see ``_CachedDecode``)."""
    batch = [items[i] for i in rows]
    run = _CachedDecode(core, batch, params.max_new_tokens)
    eos = torch.tensor(sorted(core.eos_ids), dtype=torch.long, device=core.device)
    out = _Outputs(len(batch))
    stop_window = max((len(s) for s in params.stop), default=0) + 8
    tokens_in = sum(len(it.prompt_ids) for it in batch)
    with install_hooks(core.layers, run.state):
        logits = run.prefill()
        for step in range(params.max_new_tokens):
            core.checkpoint()
            tokens = sample(logits, params, run.keys, step)
            if params.logprobs:
                record_logprobs(
                    logits,
                    tokens,
                    run.active,
                    params.top_logprobs,
                    out.step_logprobs,
                    out.finished,
                    core.token_string,
                )
            active = run.active.tolist()
            hit_eos = torch.isin(tokens, eos).tolist() if not params.ignore_eos else None
            _accept(core, out, tokens.tolist(), active, hit_eos, params, stop_window)
            keep = [j for j, row in enumerate(active) if not out.finished[row]]
            if not keep or step + 1 == params.max_new_tokens:
                break
            logits = run.step(run.keep(keep, tokens))
            tokens_in += len(keep)
    core._count(len(batch), tokens_in)
    return results(core, batch, rows, out.generated, out.finish, out.step_logprobs, params)


def results(
    core: HFCore,
    batch: Sequence[EngineItem],
    rows: list[int],
    generated: Sequence[Sequence[int]],
    finish: list[str],
    step_logprobs: list[list[StepLogprob]],
    params: GenParams,
) -> list[tuple[int, GenResult]]:
    """Each row's result: text without a final end-of-turn token, cut at the first stop."""
    out: list[tuple[int, GenResult]] = []
    for b in range(len(batch)):
        ids = [int(t) for t in generated[b]]
        body = ids[:-1] if ids and ids[-1] in core.eos_ids and finish[b] == "stop" else ids
        text = str(core.tokenizer.decode(body, skip_special_tokens=True))
        for s in params.stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        out.append(
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
    return out


@torch.inference_mode()
def generate_fast(
    core: HFCore, items: Sequence[EngineItem], rows: list[int], params: GenParams
) -> list[tuple[int, GenResult]]:
    """Generate through ``fastgen`` (see there): prefix-shared prefill, then decode steps
    (replayed from the call's CUDA graph on a GPU). Host bookkeeping is whole-array numpy;
    on a non-static (CPU) run finished rows leave the batch."""
    fast = core.fast
    assert fast is not None
    batch = [items[i] for i in rows]
    count = len(batch)
    steps = params.max_new_tokens
    # One more plan row than the batch: the unsteered shared prefix.
    plan = core._plan([it.steering for it in batch] + [[]])
    first = [first_prompt_layer(it.steering, core.num_layers) for it in batch]
    run = fast.start([it.prompt_ids for it in batch], plan, first, steps, core.checkpoint)
    logits = run.logits  # from core._logits: soft-capped where the model caps
    keys = torch.tensor([it.seed & M32 for it in batch], dtype=torch.int64, device=core.device)
    eos = np.array(sorted(core.eos_ids), dtype=np.int64)
    generated = np.zeros((count, steps), dtype=np.int64)
    lengths = np.zeros(count, dtype=np.int64)
    finished = np.zeros(count, dtype=bool)
    finish = ["length"] * count
    step_logprobs: list[list[StepLogprob]] = [[] for _ in range(count)]
    active = np.arange(count)  # batch row of each run row
    stop_window = max((len(s) for s in params.stop), default=0) + 8
    tokens_in = sum(len(it.prompt_ids) for it in batch)
    for step in range(steps):
        core.checkpoint()
        tokens = sample(logits, params, keys, step)
        if params.logprobs:
            record_logprobs(
                logits,
                tokens,
                torch.from_numpy(active),
                params.top_logprobs,
                step_logprobs,
                finished.tolist(),
                core.token_string,
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
                tail = core.tokenizer.decode(
                    generated[row, max(0, lengths[row] - stop_window) : lengths[row]].tolist()
                )
                if any(s in tail for s in params.stop):
                    finish[row] = "stop"
                    finished[row] = True
        still = ~finished[active]
        if not still.any() or step + 1 == steps:
            break
        if not fast.static and not still.all():
            keep = torch.from_numpy(np.nonzero(still)[0]).to(core.device)
            run.select(keep)
            active, keys, tokens = active[still], keys[keep], tokens[keep]
        tokens_in += int(still.sum())
        logits = run.step(tokens, step, steps - step - 2)
    core._count(count, tokens_in)
    out = [generated[b, : lengths[b]].tolist() for b in range(count)]
    return results(core, batch, rows, out, finish, step_logprobs, params)
