"""``benchmark_comparison.json``: capability accuracy vs the reference, and its report section."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from services.analyzer import stats
from services.analyzer.blocks import (
    Block,
    Cell,
    Heading,
    Paragraph,
    Table,
    badge,
    figure_blocks,
    fmt_ci,
    fmt_est,
    fmt_num,
    fmt_p,
)
from services.analyzer.classify import (
    THRESHOLDS,
    classify_benchmark_drop,
)
from services.analyzer.documents.common import (
    against_reference,
    cell_id,
    content_seed,
    precision_of,
    seed_of,
)
from services.analyzer.documents.models import BenchmarkComparison
from services.analyzer.figures import FigureImage
from services.analyzer.loading import RunArtefacts
from services.analyzer.views import BenchmarkView

__all__ = ["benchmark_comparison", "benchmarks_section"]


def _newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2 (independent proportions)."""
    w1, w2 = stats.wilson(k1, n1), stats.wilson(k2, n2)
    assert w1.value is not None and w2.value is not None
    assert w1.low is not None and w1.high is not None and w2.low is not None and w2.high is not None
    d = w1.value - w2.value
    lo = d - math.sqrt((w1.value - w1.low) ** 2 + (w2.high - w2.value) ** 2)
    hi = d + math.sqrt((w1.high - w1.value) ** 2 + (w2.value - w2.low) ** 2)
    return lo, hi


def _accuracy(view: BenchmarkView) -> dict[str, Any]:
    if view.items:
        k, n = sum(view.items.values()), len(view.items)
        w = stats.wilson(k, n)
        return {
            "value": w.value,
            "low": w.low,
            "high": w.high,
            "n": n,
            "correct": k,
            "method": "wilson",
        }
    return {
        "value": view.accuracy,
        "low": view.low,
        "high": view.high,
        "n": view.n,
        "method": "as reported by the benchmark result",
    }


def benchmark_comparison(run: RunArtefacts) -> BenchmarkComparison:
    """``benchmark_comparison.json``: accuracy and Δpp vs the reference, with intervals."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, content_seed(run)
    entries: list[dict[str, Any]] = []
    for (model, name), ref_id, ref, v in against_reference(
        run, run.benchmarks, lambda v: (v.name,)
    ):
        entry: dict[str, Any] = {
            "model": model,
            "benchmark": name,
            "variant": v.variant,
            "precision": precision_of(v.variant),
            "accuracy": _accuracy(v),
            "is_reference": v.variant == ref_id,
            "sources": {"result": v.key, "reference": ref.key if ref else None},
        }
        if ref is None or v.variant == ref_id:
            if ref is None:
                entry["classification"] = classify_benchmark_drop(None).to_json()
            entries.append(entry)
            continue
        delta: dict[str, Any] = {"value": None, "low": None, "high": None}
        if ref.accuracy is not None and v.accuracy is not None:
            delta["value"] = (v.accuracy - ref.accuracy) * 100.0
        common = sorted(set(ref.items or {}) & set(v.items or {}))
        if ref.items and v.items and common:
            a = [float(v.items[q]) for q in common]
            b = [float(ref.items[q]) for q in common]
            est = stats.bootstrap_diff(
                a, b, paired=True, resamples=resamples, seed=seed_of(base_seed, cell_id(run, v.key))
            )
            delta.update(
                {
                    "value": None if est.value is None else est.value * 100.0,
                    "low": None if est.low is None else est.low * 100.0,
                    "high": None if est.high is None else est.high * 100.0,
                    "n": len(common),
                    "method": "paired percentile-bootstrap over shared items",
                }
            )
            entry["mcnemar"] = stats.mcnemar(
                [v.items[q] for q in common], [ref.items[q] for q in common]
            ).to_json()
        elif v.accuracy is not None and ref.accuracy is not None and v.n and ref.n:
            lo, hi = _newcombe(round(v.accuracy * v.n), v.n, round(ref.accuracy * ref.n), ref.n)
            delta.update(
                {"low": lo * 100.0, "high": hi * 100.0, "method": "newcombe (independent)"}
            )
        entry["delta_pp"] = delta
        drop = None if delta["value"] is None else -delta["value"]
        low = None if delta["high"] is None else -delta["high"]
        high = None if delta["low"] is None else -delta["low"]
        entry["drop_pp"] = drop
        entry["classification"] = classify_benchmark_drop(drop, low, high).to_json()
        entries.append(entry)
    return BenchmarkComparison.model_validate(
        {
            "run_id": run.run_id,
            "reference_precision": run.reference,
            "threshold": THRESHOLDS["benchmark_drop_pp"].to_json(),
            "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
            "entries": entries,
        }
    )


# ---------------------------------------------------------------------------------------------


def benchmarks_section(doc: BenchmarkComparison, figures: Sequence[FigureImage]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Capability benchmarks", "benchmarks"),
        Paragraph(
            "Length-normalised log-likelihood accuracy (Wilson 95% interval). Δpp: variant − "
            "reference in percentage points, paired bootstrap over shared items; McNemar: exact "
            "test on the discordant items. Source: analysis/benchmark_comparison.json."
        ),
    ]
    blocks += figure_blocks(figures, "benchmark-accuracy")
    rows: list[tuple[Cell, ...]] = []
    for e in doc.entries:
        acc = e.accuracy
        mc = e.mcnemar
        rows.append(
            (
                e.model,
                e.benchmark,
                e.variant,
                fmt_num(acc.get("n")),
                fmt_ci(acc.get("value"), acc.get("low"), acc.get("high"), 1, 100.0),
                "reference" if e.is_reference else fmt_est(e.delta_pp, 2),
                "—" if not mc else fmt_p(mc.get("p_value")),
                "—" if e.is_reference else badge(e.classification),
            )
        )
    blocks.append(
        Table(
            (
                "model",
                "benchmark",
                "variant",
                "n",
                "accuracy % [95% CI]",
                "Δpp [95% CI]",
                "McNemar p",
                "class",
            ),
            tuple(rows),
        )
    )
    return blocks
