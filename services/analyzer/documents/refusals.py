"""Extraction refusals across precisions: how often each variant refused the adversarial system
prompts of a pv contrast set, against the reference, and extractions whose vector rests on few
pairs after vetting (issue 17, "Both directions": extraction refusals).

What the extractor records (``ExtractSummary.vetting``): kept and dropped examples per class
and the refusal rate per class (refusals / judged examples of that class), so the refusal
count is ``rate * (kept + dropped)`` exactly. Only native extractions count: a replayed
extraction reuses the reference's responses and verdicts, so its rate is the reference's.

Per variant: the positive-class (adversarial prompt) refusal rate with a Wilson interval; for
a non-reference variant the difference from the reference with Newcombe's hybrid score
interval (built from the two Wilson intervals) and Fisher's exact test (scipy). A cell is
flagged ``few_pairs`` when the training set the vector was computed from has fewer than
``FEW_PAIRS_FACTOR * extraction.vetting.min_keep`` examples of a class, or vetting dropped
more than ``MAX_DROPPED_SHARE`` of a class.
"""

from __future__ import annotations

import math
from typing import Any

from services.analyzer.blocks import Block, Table, fmt_ci, fmt_num
from services.analyzer.loading import Extraction, RunArtefacts
from services.analyzer.stats import Estimate, wilson

__all__ = [
    "FEW_PAIRS_FACTOR",
    "MAX_DROPPED_SHARE",
    "extraction_refusals",
    "newcombe_difference",
    "refusal_blocks",
]

FEW_PAIRS_FACTOR = 2
MAX_DROPPED_SHARE = 0.5


def _counts(ex: Extraction, label: str) -> tuple[int, int]:
    """(refusals, judged) of one class of an extraction's vetting."""
    vet = ex.summary.vetting
    n = vet.kept_pos + vet.dropped_pos if label == "pos" else vet.kept_neg + vet.dropped_neg
    rate = vet.refusal_rate_pos if label == "pos" else vet.refusal_rate_neg
    return round(rate * n), n


def newcombe_difference(a: Estimate, b: Estimate) -> dict[str, Any]:
    """``a - b`` of two Wilson proportions with Newcombe's hybrid score interval (method 10)."""
    if a.value is None or b.value is None:
        return {"value": None, "low": None, "high": None, "method": "newcombe"}
    assert a.low is not None and a.high is not None and b.low is not None and b.high is not None
    d = a.value - b.value
    low = d - math.hypot(a.value - a.low, b.high - b.value)
    high = d + math.hypot(a.high - a.value, b.value - b.low)
    return {"value": d, "low": low, "high": high, "method": "newcombe"}


def _few_pairs(run: RunArtefacts, ex: Extraction) -> list[str]:
    """Why this extraction's vector rests on few pairs (empty when it does not)."""
    vet, s = ex.summary.vetting, ex.summary
    need = FEW_PAIRS_FACTOR * run.spec.extraction.vetting.min_keep
    why = []
    if min(s.n_train_pos, s.n_train_neg) < need:
        why.append(
            f"trained on {s.n_train_pos} / {s.n_train_neg} pos / neg examples "
            f"(fewer than {need} = {FEW_PAIRS_FACTOR} x vetting.min_keep)"
        )
    for label, kept, dropped in (
        ("positives", vet.kept_pos, vet.dropped_pos),
        ("negatives", vet.kept_neg, vet.dropped_neg),
    ):
        if kept + dropped and dropped / (kept + dropped) > MAX_DROPPED_SHARE:
            why.append(f"vetting dropped {dropped} of {kept + dropped} {label}")
    return why


def _row(run: RunArtefacts, ex: Extraction, ref: Extraction | None) -> dict[str, Any]:
    refused, n = _counts(ex, "pos")
    refused_neg, n_neg = _counts(ex, "neg")
    rate = wilson(refused, n)
    row: dict[str, Any] = {
        "variant": ex.variant,
        "trait": ex.trait,
        "is_reference": ref is None,
        "refusals": refused,
        "n": n,
        "rate": rate.to_json(),
        "refusals_negative": refused_neg,
        "n_negative": n_neg,
        "kept": [ex.summary.vetting.kept_pos, ex.summary.vetting.kept_neg],
        "dropped": [ex.summary.vetting.dropped_pos, ex.summary.vetting.dropped_neg],
        "train": [ex.summary.n_train_pos, ex.summary.n_train_neg],
        "few_pairs": _few_pairs(run, ex),
        "sources": {"summary": ex.summary_key},
    }
    if ref is not None:
        ref_refused, ref_n = _counts(ref, "pos")
        row["difference"] = newcombe_difference(rate, wilson(ref_refused, ref_n))
        if n and ref_n:
            table = [[refused, n - refused], [ref_refused, ref_n - ref_refused]]
            from scipy.stats import fisher_exact  # lazily: importing the analyzer stays light

            row["fisher_p"] = float(fisher_exact(table).pvalue)
    return row


def extraction_refusals(run: RunArtefacts) -> list[dict[str, Any]]:
    """One row per native, vetted extraction: refusal rate and its difference from the
    reference's, and the few-pairs flag."""
    rows: list[dict[str, Any]] = []
    for model in run.models():
        ref_id = run.reference_of(model)
        variants = [v.id for v in run.variants if v.model.name == model]
        traits = sorted({t for (v, t, m) in run.extractions if v in variants and m == "native"})
        for trait in traits:
            ref = run.extractions.get((ref_id, trait, "native"))
            for variant in [ref_id, *[v for v in variants if v != ref_id]]:
                ex = run.extractions.get((variant, trait, "native"))
                if ex is None or not ex.summary.vetting.enabled:
                    continue
                is_ref = variant == ref_id
                if not is_ref and (ref is None or not ref.summary.vetting.enabled):
                    continue
                rows.append(_row(run, ex, None if is_ref else ref))
    return rows


def refusal_blocks(rows: list[Any]) -> list[Block]:
    """The report's extraction-refusals table (rows as stored in the document)."""
    if not rows:
        return []
    out = []
    for r in rows:
        rate, diff = r["rate"], r.get("difference") or {}
        out.append(
            (
                r["variant"],
                r["trait"],
                f"{r['refusals']} / {r['n']}",
                fmt_ci(rate["value"], rate["low"], rate["high"], 2),
                "—"
                if r["is_reference"]
                else fmt_ci(diff.get("value"), diff.get("low"), diff.get("high"), 2),
                fmt_num(r.get("fisher_p"), 3),
                f"{r['train'][0]} / {r['train'][1]}",
                "; ".join(r["few_pairs"]) or "—",
            )
        )
    return [
        Table(
            (
                "variant",
                "trait",
                "refused",
                "rate [95% Wilson]",
                "− reference [95% Newcombe]",
                "Fisher p",
                "train pos / neg",
                "few pairs",
            ),
            tuple(out),
            "Extraction refusals: how often each variant refused the contrast set's "
            "adversarial (positive) system prompts when generating its own responses (native "
            "extractions; a replay reuses the reference's). 'few pairs': the vector rests on "
            "few examples after vetting.",
        )
    ]
