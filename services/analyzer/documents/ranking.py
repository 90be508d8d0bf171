"""``robustness_ranking.json``: probe vs mean_diff, model families and size, and its report section."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from services.analyzer import stats
from services.analyzer.blocks import (
    Block,
    Cell,
    Heading,
    Paragraph,
    Table,
    fmt_est,
    fmt_num,
    fmt_test,
)
from services.analyzer.documents.common import (
    content_seed,
    model_of,
    precision_of,
    seed_of,
)
from services.analyzer.documents.models import (
    BenchmarkComparison,
    RankedRow,
    RobustnessRanking,
    SteeringComparison,
    VectorComparison,
)
from services.analyzer.documents.steering import IMPORTED_PREFIX
from services.analyzer.loading import (
    RunArtefacts,
)
from services.common.precisions import bits

__all__ = ["ranking_section", "robustness_ranking"]


def _method_pairs(
    conditions: Mapping[tuple[Any, ...], Mapping[str, float]],
    methods: Sequence[str],
    resamples: int,
    seed: int,
    higher_is_better: bool,
) -> list[dict[str, Any]]:
    out = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            both = [c for c, vals in conditions.items() if a in vals and b in vals]
            xa = [conditions[c][a] for c in both]
            xb = [conditions[c][b] for c in both]
            sign = 1.0 if higher_is_better else -1.0
            out.append(
                {
                    "a": a,
                    "b": b,
                    "n_conditions": len(both),
                    "mean_difference": stats.bootstrap_diff(
                        xa, xb, paired=True, resamples=resamples, seed=seed_of(seed, a, b)
                    ).to_json(),
                    "wilcoxon": stats.wilcoxon(xa, xb).to_json(),
                    "a_more_robust": sum(
                        1 for p, q in zip(xa, xb, strict=True) if sign * (p - q) > 0
                    ),
                    "b_more_robust": sum(
                        1 for p, q in zip(xa, xb, strict=True) if sign * (q - p) > 0
                    ),
                }
            )
    return out


def _rank(rows: list[dict[str, Any]], key: str, higher_is_better: bool) -> list[dict[str, Any]]:
    def sort_key(r: dict[str, Any]) -> tuple[int, float]:
        v = (r.get(key) or {}).get("value")
        if v is None:
            return (1, 0.0)
        return (0, -v if higher_is_better else v)

    ranked = sorted(rows, key=sort_key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i if (r.get(key) or {}).get("value") is not None else None
    return ranked


_Inputs = tuple[VectorComparison, SteeringComparison, BenchmarkComparison]


def _conditions(
    vectors: VectorComparison, steering: SteeringComparison
) -> tuple[dict[tuple[Any, ...], dict[str, float]], dict[tuple[Any, ...], dict[str, float]]]:
    """Vector cosine per (model, trait, variant) and steering degradation per steering
    condition, each by method (primary vector mode only)."""
    cos_cond: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for v in vectors.entries:
        mc = v.window.mean_cosine
        if v.primary and mc is not None:
            cos_cond[(v.model, v.trait, v.variant)][v.method] = mc
    deg_cond: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for e in steering.entries:
        d = (e.degradation_pct or {}).get("value")
        if d is not None and not e.source.startswith(IMPORTED_PREFIX):
            cond = (e.model, e.trait, e.target, e.steering, e.mode, e.direction)
            deg_cond[cond][e.method] = d
    return cos_cond, deg_cond


def _compare_methods(
    conditions: Mapping[tuple[Any, ...], Mapping[str, float]],
    methods: Sequence[str],
    tag: str,
    higher: bool,
    resamples: int,
    base_seed: int,
) -> dict[str, Any]:
    return {
        "higher_is_better": higher,
        "by_method": {
            m: stats.bootstrap(
                [v[m] for v in conditions.values() if m in v],
                resamples=resamples,
                seed=seed_of(base_seed, tag, m),
            ).to_json()
            for m in methods
        },
        "pairs": _method_pairs(conditions, methods, resamples, base_seed, higher),
    }


def _collect(
    group_of: Callable[[str], str | None], docs: _Inputs
) -> dict[str, dict[str, list[float]]]:
    """Cosines, degradations and benchmark drops of every group (``group_of(variant)``)."""
    vectors, steering, benchmarks = docs
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for v in vectors.entries:
        g = group_of(v.variant)
        if g is not None and v.primary and v.window.mean_cosine is not None:
            out[g]["cosine"].append(v.window.mean_cosine)
    for e in steering.entries:
        g = group_of(e.target)
        d = (e.degradation_pct or {}).get("value")
        # Imported vector sets are reported apart (steering section), not ranked.
        if g is not None and d is not None and not e.source.startswith(IMPORTED_PREFIX):
            out[g]["degradation"].append(d)
    for b in benchmarks.entries:
        g = group_of(b.variant)
        if g is not None and b.drop_pp is not None:
            out[g]["drop"].append(b.drop_pp)
    return out


def _summarise(
    values: Mapping[str, list[float]], tag: str, resamples: int, base_seed: int
) -> dict[str, Any]:
    return {
        "mean_cosine": stats.bootstrap(
            values.get("cosine", []), resamples=resamples, seed=seed_of(base_seed, tag, "c")
        ).to_json(),
        "mean_degradation_pct": stats.bootstrap(
            values.get("degradation", []),
            resamples=resamples,
            seed=seed_of(base_seed, tag, "d"),
        ).to_json(),
        "mean_drop_pp": stats.bootstrap(
            values.get("drop", []), resamples=resamples, seed=seed_of(base_seed, tag, "b")
        ).to_json(),
    }


def _rankings(
    run: RunArtefacts, docs: _Inputs, resamples: int, base_seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Precisions, models and families ranked by mean cosine (non-reference variants)."""

    def summarise(values: Mapping[str, list[float]], tag: str) -> dict[str, Any]:
        return _summarise(values, tag, resamples, base_seed)

    def quantized(v: str) -> bool:
        return precision_of(v) != run.reference

    by_precision = _collect(lambda v: precision_of(v) if quantized(v) else None, docs)
    precisions = _rank(
        [
            {"precision": p, "bits": bits(p), **summarise(vals, f"p:{p}")}
            for p, vals in sorted(by_precision.items())
        ],
        "mean_cosine",
        True,
    )
    models_meta = {v.model.name: v.model for v in run.variants}
    by_model = _collect(lambda v: model_of(v) if quantized(v) else None, docs)
    models = _rank(
        [
            {
                "model": m,
                "family": models_meta[m].family or None,
                "size_b": models_meta[m].size_b or None,
                **summarise(vals, f"m:{m}"),
            }
            for m, vals in sorted(by_model.items())
            if m in models_meta
        ],
        "mean_cosine",
        True,
    )
    fam_of = {m: (meta.family or None) for m, meta in models_meta.items()}
    by_family = _collect(lambda v: fam_of.get(model_of(v)) if quantized(v) else None, docs)
    families = _rank(
        [
            {
                "family": f,
                "models": sorted(m for m, fam in fam_of.items() if fam == f),
                **summarise(vals, f"f:{f}"),
            }
            for f, vals in sorted(by_family.items())
        ],
        "mean_cosine",
        True,
    )
    return precisions, models, families


def robustness_ranking(
    run: RunArtefacts,
    vectors: VectorComparison,
    steering: SteeringComparison,
    benchmarks: BenchmarkComparison,
) -> RobustnessRanking:
    """``robustness_ranking.json``: probe vs mean_diff (and pca), precisions, models, families."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, content_seed(run)
    methods = list(spec.methods)
    cos_cond, deg_cond = _conditions(vectors, steering)
    method_comparison = {
        "vector_cosine": _compare_methods(cos_cond, methods, "cos", True, resamples, base_seed),
        "steering_degradation_pct": _compare_methods(
            deg_cond, methods, "deg", False, resamples, base_seed
        ),
    }
    docs = (vectors, steering, benchmarks)
    precisions, models, families = _rankings(run, docs, resamples, base_seed)
    sized = [m for m in models if m["size_b"] and m["mean_cosine"]["value"] is not None]
    size = {
        "models": [m["model"] for m in sized],
        "pearson": stats.pearson(
            [m["size_b"] for m in sized], [m["mean_cosine"]["value"] for m in sized]
        ).to_json(),
        "spearman": stats.spearman(
            [m["size_b"] for m in sized], [m["mean_cosine"]["value"] for m in sized]
        ).to_json(),
    }
    return RobustnessRanking.model_validate(
        {
            "run_id": run.run_id,
            "reference_precision": run.reference,
            "note": (
                "Means are over conditions (model x trait x variant, primary vector mode; for "
                "steering also steering kind, mode and direction); conditions share models and "
                "questions, so their intervals are descriptive, not independent-sample inference."
            ),
            "method_comparison": method_comparison,
            "precisions": precisions,
            "models": models,
            "families": families,
            "size": size,
        }
    )


def ranking_section(doc: RobustnessRanking) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Robustness ranking", "ranking"),
        Paragraph(doc.note + " Source: analysis/robustness_ranking.json."),
    ]
    rows: list[tuple[Cell, ...]] = []
    for metric, comp in doc.method_comparison.items():
        for p in comp["pairs"]:
            rows.append(
                (
                    metric,
                    f"{p['a']} vs {p['b']}",
                    str(p["n_conditions"]),
                    fmt_est(p["mean_difference"]),
                    fmt_test(p["wilcoxon"]),
                    f"{p['a_more_robust']} / {p['b_more_robust']}",
                )
            )
    blocks.append(Heading(3, "Extraction methods", "methods-ranking"))
    blocks.append(
        Table(
            (
                "metric",
                "methods (a vs b)",
                "conditions",
                "mean a − b [95% CI]",
                "Wilcoxon",
                "a / b more robust",
            ),
            tuple(rows),
            "Paired over conditions where both methods have a value.",
        )
    )

    def ranked(rows_in: Iterable[RankedRow], name: str, extra: Sequence[str]) -> Table:
        return Table(
            ("rank", name, *extra, "mean cosine [95% CI]", "mean degradation %", "mean drop pp"),
            tuple(
                (
                    fmt_num(r.rank),
                    str(getattr(r, name)),
                    *(_or_dash(getattr(r, x)) for x in extra),
                    fmt_est(r.mean_cosine),
                    fmt_est(r.mean_degradation_pct, 1),
                    fmt_est(r.mean_drop_pp, 2),
                )
                for r in rows_in
            ),
        )

    blocks.append(Heading(3, "Precisions", "precision-ranking"))
    blocks.append(ranked(doc.precisions, "precision", ("bits",)))
    blocks.append(Heading(3, "Models, families and size", "model-ranking"))
    blocks.append(ranked(doc.models, "model", ("family", "size_b")))
    if doc.families:
        blocks.append(ranked(doc.families, "family", ()))
    size = doc.size
    blocks.append(
        Paragraph(
            f"Model size vs mean cosine over {len(size['models'])} model(s) with a size: "
            f"Pearson {fmt_test(size['pearson'])}; Spearman {fmt_test(size['spearman'])}."
        )
    )
    return blocks


def _or_dash(value: object) -> str:
    return "—" if value is None else str(value)
