"""Capability benchmarks by log-likelihood: readers for the public file formats, and scoring.

Every question becomes ONE ``ScoreItem`` whose continuations are all of its choices, so the
loader computes the shared context once and scores every choice from its KV cache. The
prediction is the choice with the highest length-normalised log-likelihood (``logprob /
characters``, lm-evaluation-harness's ``acc_norm``); the raw argmax is reported too.

Formats (``BenchmarkSpec.format``) and prompts (zero-shot, lm-evaluation-harness style):

* ``hellaswag``: JSONL rows ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings``, ``label``,
  optional ``activity_label``. Context ``"<activity>: <ctx>"``, continuations ``" " + ending``.
* ``mmlu``: the original CSV (``question,A,B,C,D,answer``, no header; the subject comes from
  the file name) or HF-style JSON/JSONL (``question``, ``choices``, ``answer`` as index or
  letter, optional ``subject``). Context lists the choices and ends in ``"Answer:"``;
  continuations ``" A" .. " D"``.
* ``truthfulqa_mc``: JSON/JSONL with ``question``, ``mc1_targets`` and ``mc2_targets``, each
  ``{choice: label}`` (the original ``mc_task.json``) or ``{"choices": [...], "labels": [...]}``
  (HF). Context ``"Q: <question>\\nA:"``; the union of both choice lists is scored once. MC1:
  accuracy over ``mc1_targets``; MC2: normalised probability mass on the true ``mc2`` answers.
* ``arc``: JSONL with ``question.stem``, ``question.choices[{text,label}]``, ``answerKey`` (or HF
  ``question`` string + ``choices{text,label}``). Context ``"Question: <stem>\\nAnswer:"``.
* ``caa_ab``: the CAA A/B capability files (``mmlu_ab.json``, ``truthfulqa_ab.json``): a JSON
  list of ``prompt`` (or ``question``), ``correct``, ``incorrect`` like ``"(A)"``. The context is
  the chat ``[user: prompt]`` with the generation prompt; continuations are the two answers
  in letter order.

The data is a built-in (``mmlu_ab``, ``truthfulqa_ab``: package data), an ``s3://`` object
(downloaded through the local data cache) or a local file; ``benchmark_file`` resolves it.

``limit`` keeps a deterministic subset: items ordered by a hash of (seed, item text), the first
``limit`` taken, kept in file order, so a subset never depends on library versions.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

from services.common.contracts.steer import BenchmarkParams, benchmark_result_key
from services.common.contracts.steer_results import BenchmarkItem, BenchmarkResult, CallCounts
from services.common.store import AsyncS3Store
from services.loader.capabilities import Needs
from services.loader.client import ContinuationScore, LoaderClient, ScoreItem
from services.steerer.benchmark_readers import (
    PROMPT_FORMATS,
    READERS,
    MCItem,
    deterministic_subset,
    read_arc,
    read_benchmark,
    read_caa_ab,
    read_hellaswag,
    read_mmlu,
    read_truthfulqa_mc,
)
from services.steerer.context import Heartbeat, loader_record, no_heartbeat
from services.steerer.stats import bootstrap_mean, wilson

__all__ = [
    "NEEDS",
    "PROMPT_FORMATS",
    "READERS",
    "MCItem",
    "benchmark_summary",
    "deterministic_subset",
    "read_arc",
    "read_benchmark",
    "read_caa_ab",
    "read_hellaswag",
    "read_mmlu",
    "read_truthfulqa_mc",
    "run_benchmark",
    "score_items",
]

#: What a benchmark job asks of its loader: log-likelihoods of the choices (``score_items``).
NEEDS = Needs.of("score")

# Items per Score request: big enough to fill a GPU, small enough to heartbeat between.
_CHUNK = 256


# -- scoring ---------------------------------------------------------------------------------


async def score_items(
    loader: LoaderClient,
    items: Sequence[MCItem],
    *,
    heartbeat: Heartbeat = no_heartbeat,
    chunk: int = _CHUNK,
) -> tuple[list[list[ContinuationScore]], int]:
    """Every item's continuation scores (one ScoreItem per item) and the requests sent."""
    out: list[list[ContinuationScore]] = []
    calls = 0
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        out.extend(
            await loader.score([ScoreItem(it.context, list(it.continuations)) for it in part])
        )
        calls += 1
        await heartbeat()
    return out, calls


def _argmax(values: Sequence[float], among: Sequence[int]) -> int:
    return max(among, key=lambda j: (values[j], -j))


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def _predict(item: MCItem, scores: Sequence[ContinuationScore]) -> BenchmarkItem:
    lp = [s.logprob for s in scores]
    chars = [max(1, s.num_chars) for s in scores]
    among = item.candidates if item.candidates is not None else range(len(lp))
    pred = _argmax([v / c for v, c in zip(lp, chars, strict=True)], list(among))
    pred_raw = _argmax(lp, list(among))
    mc2 = None
    if item.mc2_true and item.mc2_false:
        everything = _logsumexp([lp[j] for j in (*item.mc2_true, *item.mc2_false)])
        mc2 = math.exp(_logsumexp([lp[j] for j in item.mc2_true]) - everything)
    return BenchmarkItem(
        id=item.id,
        gold=list(item.gold),
        candidates=list(item.candidates) if item.candidates is not None else None,
        mc2_true=list(item.mc2_true),
        logprobs=lp,
        num_tokens=[s.num_tokens for s in scores],
        num_chars=[s.num_chars for s in scores],
        pred=pred,
        pred_raw=pred_raw,
        correct=pred in item.gold,
        correct_raw=pred_raw in item.gold,
        mc2=mc2,
    )


def benchmark_summary(result: BenchmarkResult, key: str) -> dict[str, Any]:
    """The small job-record summary of a benchmark result."""
    return {
        "key": key,
        "n": result.n,
        "metric": result.metric,
        "accuracy": result.accuracy.value,
        "accuracy_ci": [result.accuracy.low, result.accuracy.high],
        "mc2": result.mc2.value if result.mc2 else None,
    }


async def run_benchmark(
    run_id: str,
    params: BenchmarkParams,
    *,
    store: AsyncS3Store,
    loader: LoaderClient,
    heartbeat: Heartbeat = no_heartbeat,
) -> dict[str, Any]:
    """Run one benchmark job and write its result; returns the job-record summary."""
    spec = params.benchmark
    key = benchmark_result_key(run_id, params)
    started = time.monotonic()
    items, digest = await asyncio.to_thread(read_benchmark, spec)
    chosen = deterministic_subset(items, spec.limit, spec.seed, key=lambda it: it.text)
    info = await loader.info()
    scores, calls = await score_items(loader, chosen, heartbeat=heartbeat)
    predictions = [_predict(it, s) for it, s in zip(chosen, scores, strict=True)]
    n = len(predictions)
    correct = [p.correct for p in predictions]
    mc2_values: list[float | None] = [p.mc2 for p in predictions if p.mc2 is not None]
    result = BenchmarkResult(
        run_id=run_id,
        variant=params.variant,
        name=spec.name,
        format=spec.file_format,
        path=spec.location,
        file_sha256=digest,
        n_total=len(items),
        n=n,
        limit=spec.limit,
        seed=spec.seed,
        metric="mc1_acc_norm" if spec.file_format == "truthfulqa_mc" else "acc_norm",
        accuracy=wilson(sum(correct), n),
        accuracy_bootstrap=bootstrap_mean([float(c) for c in correct], seed=spec.seed),
        accuracy_raw=wilson(sum(p.correct_raw for p in predictions), n),
        mc2=bootstrap_mean(mc2_values, seed=spec.seed) if mc2_values else None,
        prompt_format=PROMPT_FORMATS[spec.file_format],
        items=predictions,
        loader=loader_record(info),
        calls=CallCounts(loader_calls=calls, loader_rows=n, judge_calls=0, judge_items=0),
        seconds=round(time.monotonic() - started, 3),
    )
    if not await store.put_json(key, result.model_dump(mode="json")):
        result = BenchmarkResult.model_validate(await store.get_json(key))
    return benchmark_summary(result, key)
