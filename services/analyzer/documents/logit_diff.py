"""``logit_diff_comparison.json``: CAA logit differences vs the reference, and its report section."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from services.analyzer import stats
from services.analyzer.blocks import (
    Block,
    Cell,
    Heading,
    Paragraph,
    Table,
    badge,
    fmt_est,
    fmt_num,
)
from services.analyzer.classify import (
    THRESHOLDS,
    classify_logit_correlation,
)
from services.analyzer.documents.common import (
    F64,
    against_reference,
    cell_id,
    content_seed,
    finite,
    precision_of,
    seed_of,
)
from services.analyzer.documents.models import LogitDiffComparison
from services.analyzer.loading import RunArtefacts
from services.analyzer.views import LogitDiffView

__all__ = ["logit_diff_comparison", "logit_diff_section"]


def _pearson_rows(x: F64, y: F64) -> F64:
    """Pearson r along the last axis (NaN where either side is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    num = (xc * yc).sum(axis=-1)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(den > 0, num / den, np.nan), dtype=np.float64)


def _zmean(r: F64, axis: int) -> F64:
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as wanted
        return np.asarray(np.tanh(np.nanmean(z, axis=axis)), dtype=np.float64)


def _compare_logit_diff(
    ref: LogitDiffView, var: LogitDiffView, resamples: int, seed: int
) -> dict[str, Any]:
    # Multiples of the unit coefficient are the shared axis: coefficients are in units of each
    # variant's own vector norm and differ across variants.
    coefs = [c for c in ref.multiples if any(abs(c - d) <= 1e-9 for d in var.multiples)]
    ci_ref = [ref.multiples.index(c) for c in coefs]
    ci_var = [next(k for k, d in enumerate(var.multiples) if abs(c - d) <= 1e-9) for c in coefs]
    questions = sorted(set(ref.per_question) & set(var.per_question))

    def matrix(view: LogitDiffView, cols: list[int]) -> F64:
        rows = []
        for q in questions:
            vals = view.per_question[q]
            rows.append(
                [vals[k] if k < len(vals) and vals[k] is not None else np.nan for k in cols]
            )
        return np.asarray(rows, dtype=np.float64).reshape(len(questions), len(cols))

    a, b = matrix(ref, ci_ref), matrix(var, ci_var)
    keep = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a, b = a[keep], b[keep]
    per_coef: list[dict[str, Any]] = []
    for k, c in enumerate(coefs):
        shift = stats.bootstrap_diff(
            b[:, k], a[:, k], paired=True, resamples=resamples, seed=seed_of(seed, "shift", c)
        )
        per_coef.append(
            {
                "multiple": c,
                "pearson": stats.pearson(a[:, k], b[:, k]).to_json(),
                "spearman": stats.spearman(a[:, k], b[:, k]).to_json(),
                "reference_mean": finite(a[:, k].mean()) if a.shape[0] else None,
                "variant_mean": finite(b[:, k].mean()) if b.shape[0] else None,
                "mean_shift": shift.to_json(),
            }
        )
    n = int(a.shape[0])
    summary: dict[str, Any] = {"value": None, "low": None, "high": None, "n": n}
    if n >= 3 and coefs:
        point = _zmean(_pearson_rows(a.T, b.T), axis=0)
        summary["value"] = finite(point)
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = rng.integers(0, n, size=(resamples, n))
        r = _pearson_rows(a[idx].transpose(0, 2, 1), b[idx].transpose(0, 2, 1))  # [B, K]
        samples = _zmean(r, axis=1)
        samples = samples[np.isfinite(samples)]
        if samples.size:
            lo, hi = np.quantile(samples, [0.025, 0.975])
            summary["low"], summary["high"] = float(lo), float(hi)
        summary["method"] = (
            "Fisher-z mean over coefficients of Pearson r across questions; "
            "percentile-bootstrap over questions"
        )
    else:
        summary["reason"] = f"n = {n} shared questions with values at every coefficient (< 3)"
    return {
        "multiples": coefs,
        "n_questions": n,
        "per_coefficient": per_coef,
        "correlation": summary,
        "slope": {
            "reference": {"value": ref.slope, "low": ref.slope_low, "high": ref.slope_high},
            "variant": {"value": var.slope, "low": var.slope_low, "high": var.slope_high},
            "ratio": None if not ref.slope or var.slope is None else var.slope / ref.slope,
        },
    }


def logit_diff_comparison(run: RunArtefacts) -> LogitDiffComparison:
    """``logit_diff_comparison.json``: per-question logit differences vs the reference."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, content_seed(run)
    entries: list[dict[str, Any]] = []
    # Each variant with its own vectors; cross-precision ones are in both_directions.
    own = [v for v in run.logit_diff if v.source == v.variant]
    cells = against_reference(run, own, lambda v: (v.trait, v.method))
    for (model, trait, method), ref_id, ref, v in cells:
        entry: dict[str, Any] = {
            "model": model,
            "trait": trait,
            "method": method,
            "variant": v.variant,
            "precision": precision_of(v.variant),
            "vector_mode": v.vector_mode,
            "layer": v.layer,
            "multiples": v.multiples,
            "coefficients": v.coefficients,
            "mean": v.mean,
            "unsteered": v.unsteered,
            "slope": {"value": v.slope, "low": v.slope_low, "high": v.slope_high},
            "n_questions": len(v.per_question),
            "is_reference": v.variant == ref_id,
            "sources": {"result": v.key, "reference": ref.key if ref else None},
        }
        if ref is None:
            entry["classification"] = classify_logit_correlation(None).to_json()
            entry["reason"] = "no reference logit-difference result"
        elif v.variant != ref_id:
            cmp = _compare_logit_diff(ref, v, resamples, seed_of(base_seed, cell_id(run, v.key)))
            entry["comparison"] = cmp
            c = cmp["correlation"]
            entry["classification"] = classify_logit_correlation(
                c["value"], c["low"], c["high"]
            ).to_json()
        entries.append(entry)
    return LogitDiffComparison.model_validate(
        {
            "run_id": run.run_id,
            "reference_precision": run.reference,
            "threshold": THRESHOLDS["logit_diff_correlation"].to_json(),
            "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
            "entries": entries,
        }
    )


# ---------------------------------------------------------------------------------------------


def logit_diff_section(doc: LogitDiffComparison) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Logit difference (CAA A/B)", "logit-diff"),
        Paragraph(
            "Per-question logit(matching) − logit(not matching) under steering at each multiple "
            "of the unit coefficient. Correlation: Pearson r between the variant's and the "
            "reference's per-question values at each multiple, averaged through Fisher's z; "
            "interval: bootstrap over questions. Source: analysis/logit_diff_comparison.json."
        ),
    ]
    rows: list[tuple[Cell, ...]] = []
    for e in doc.entries:
        cmp = e.comparison or {}
        corr = cmp.get("correlation") or {}
        rows.append(
            (
                e.model,
                e.trait,
                e.method,
                e.variant,
                str(e.n_questions),
                fmt_num(e.unsteered, 2),
                fmt_est(e.slope, 2),
                "reference" if e.is_reference else fmt_est(corr),
                fmt_num((cmp.get("slope") or {}).get("ratio"), 2),
                "—" if e.is_reference else badge(e.classification),
            )
        )
    blocks.append(
        Table(
            (
                "model",
                "trait",
                "method",
                "variant",
                "questions",
                "unsteered mean",
                "slope [95% CI]",
                "r vs reference [95% CI]",
                "slope ratio",
                "class",
            ),
            tuple(rows),
        )
    )
    return blocks
