"""The ``logit_diff`` job: CAA A/B logit difference under a sweep of steering coefficients.

Each held-out A/B question is asked with the assistant's answer opened as ``"("`` (continued in
place), so the next token is the answer letter (SmolLM2 and the byte-level test tokenizer split
``"(A"`` into ``"("`` + ``"A"``, so this is the position the model naturally answers at). One
``NextToken`` request carries every (question, coefficient) row with its own steering and
returns the raw logits of the letters; the value per row is ``logit(matching letter) -
logit(other letter)``.

Coefficients are multiples of the *unit coefficient* ``activation_norm[layer] / ||v||``: multiple
1 adds a vector as long as a typical activation at that layer. The unsteered value (multiple 0)
is always included. The slope of the mean logit difference over the multiples is the
steerability, with a bootstrap interval over questions.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.common.contracts.steer import LogitDiffParams, logit_diff_result_key
from services.common.contracts.steer_results import (
    CallCounts,
    LogitDiffCoefficient,
    LogitDiffItemResult,
    LogitDiffResult,
)
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.store import AsyncS3Store
from services.extractor.datasets import LogitDiffItem, TraitDataset, load_trait, logit_diff_items
from services.loader.capabilities import Needs
from services.loader.client import Chat, LoaderClient, NextToken, PromptItem, Steer
from services.steerer.benchmarks import deterministic_subset
from services.steerer.context import Heartbeat, loader_record, no_heartbeat
from services.steerer.sources import layer_at_depth, load_vector_source
from services.steerer.stats import bootstrap_mean, bootstrap_slope

__all__ = ["NEEDS", "logit_diff_summary", "run_logit_diff"]

PROMPT_SUFFIX = "("
#: What a logit_diff job asks of its loader: next-token logits under the ``Steer`` rows of
#: ``run_logit_diff`` (add, at every position: ``Steer``'s defaults).
NEEDS = Needs.of("next_token", steering=[("add", "all")])


def _items(dataset: TraitDataset, limit: int | None) -> list[LogitDiffItem]:
    items = logit_diff_items(dataset, "test" if dataset.ab_test else "train")
    return deterministic_subset(items, limit, 0, key=lambda it: it.question)


def _ols_slope(x: list[float], y: list[float]) -> float | None:
    xs = np.asarray(x)
    dx = xs - xs.mean()
    sxx = float((dx * dx).sum())
    if sxx == 0:
        return None
    return float(((np.asarray(y) - np.mean(y)) * dx).sum() / sxx)


def logit_diff_summary(result: LogitDiffResult, key: str) -> dict[str, Any]:
    """The small job-record summary of a logit-difference result."""
    return {
        "key": key,
        "n": result.n,
        "layer": result.layer,
        "unsteered_mean": result.unsteered.value,
        "slope": result.slope.value,
        "slope_ci": [result.slope.low, result.slope.high],
    }


async def run_logit_diff(
    run_id: str,
    params: LogitDiffParams,
    *,
    store: AsyncS3Store,
    loader: LoaderClient,
    heartbeat: Heartbeat = no_heartbeat,
) -> dict[str, Any]:
    """Run one logit_diff job and write its result; returns the job-record summary."""
    key = logit_diff_result_key(run_id, params)
    started = time.monotonic()
    dataset = await asyncio.to_thread(load_trait, params.trait.ref)
    spec = params.logit_diff
    items = _items(dataset, spec.limit)
    info = await loader.info()
    source = await load_vector_source(
        store, run_id, params.source, params.trait.name, params.method, params.vector_mode
    )
    usable = [layer for layer in source.layers if source.usable(layer) is None]
    layer = layer_at_depth(spec.layer_fraction, info.num_layers, usable)
    act = source.activation_norm(layer)
    vnorm = source.norm(layer)
    assert act is not None
    unit = act / vnorm
    multiples = sorted({float(m) for m in spec.coefficients} | {0.0})
    coefficients = [m * unit for m in multiples]
    letters = sorted({it.matching for it in items} | {it.not_matching for it in items})
    column = {letter: j for j, letter in enumerate(letters)}
    rows = [
        PromptItem(
            Chat.of(item.message_dicts(), continue_final=True),
            steering=[Steer(layers=[layer], coefficient=c, vector_ref=0)] if c != 0.0 else [],
        )
        for item in items
        for c in coefficients
    ]
    try:
        outputs = await loader.next_token(
            rows, top_k=1, token_strings=letters, vectors=[source.vector(layer)]
        )
    except InvalidArgument as exc:
        if exc.field.startswith("token_strings"):
            raise FailedPrecondition(
                f"the answer letters {letters} are not single tokens for {params.variant}: "
                f"{exc.message}"
            ) from None
        raise
    await heartbeat()
    per_item = _item_results(items, outputs, multiples, column)
    per_coefficient = _per_coefficient(multiples, coefficients, per_item)
    zero = multiples.index(0.0)
    result = LogitDiffResult(
        run_id=run_id,
        variant=params.variant,
        source=params.source,
        trait=params.trait.name,
        method=params.method,
        vector_mode=params.vector_mode,
        layer=layer,
        vector_norm=vnorm,
        activation_norm=act,
        unit_coefficient=unit,
        multiples=multiples,
        coefficients=coefficients,
        letter_tokens=letters,
        prompt_suffix=PROMPT_SUFFIX,
        unsteered=per_coefficient[zero].mean,
        per_coefficient=per_coefficient,
        slope=bootstrap_slope(multiples, [r.values for r in per_item]),
        items=per_item,
        n=len(per_item),
        loader=loader_record(info),
        calls=CallCounts(loader_calls=1, loader_rows=len(rows), judge_calls=0, judge_items=0),
        seconds=round(time.monotonic() - started, 3),
    )
    if not await store.put_json(key, result.model_dump(mode="json")):
        result = LogitDiffResult.model_validate(await store.get_json(key))
    return logit_diff_summary(result, key)


def _item_results(
    items: Sequence[LogitDiffItem],
    outputs: Sequence[NextToken],
    multiples: list[float],
    column: dict[str, int],
) -> list[LogitDiffItemResult]:
    """Per item: the matching-minus-other logit and P(matching) at each multiple, and the slope
    (``outputs`` holds each item's rows, one per multiple, item after item)."""
    k = len(multiples)
    per_item: list[LogitDiffItemResult] = []
    for i, item in enumerate(items):
        values: list[float] = []
        probs: list[float] = []
        for j in range(k):
            out = outputs[i * k + j]
            mi, oi = column[item.matching], column[item.not_matching]
            values.append(out.requested_logits[mi] - out.requested_logits[oi])
            lm, lo = out.requested_logprobs[mi], out.requested_logprobs[oi]
            top = max(lm, lo)
            pm, po = math.exp(lm - top), math.exp(lo - top)
            probs.append(pm / (pm + po))
        per_item.append(
            LogitDiffItemResult(
                item_id=item.item_id,
                matching=item.matching,
                not_matching=item.not_matching,
                values=values,
                p_matching=probs,
                slope=_ols_slope(multiples, values),
            )
        )
    return per_item


def _per_coefficient(
    multiples: list[float], coefficients: list[float], per_item: list[LogitDiffItemResult]
) -> list[LogitDiffCoefficient]:
    """Per coefficient: the mean logit difference (bootstrap), the share of items above zero and
    the mean P(matching)."""
    per_coefficient = []
    for j, (m, c) in enumerate(zip(multiples, coefficients, strict=True)):
        column_values = [r.values[j] for r in per_item]
        per_coefficient.append(
            LogitDiffCoefficient(
                multiple=m,
                coefficient=c,
                mean=bootstrap_mean(column_values, seed=j),
                frac_positive=sum(v > 0 for v in column_values) / len(column_values),
                mean_p_matching=float(np.mean([r.p_matching[j] for r in per_item])),
            )
        )
    return per_coefficient
