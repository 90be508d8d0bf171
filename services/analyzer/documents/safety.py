"""``probe_statistics.json``: safety-probe statistics across precisions, and its report section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    fmt_p,
    fmt_test,
)
from services.analyzer.classify import (
    classify_cosine,
)
from services.analyzer.documents.common import (
    against_reference,
    cell_id,
    content_seed,
    precision_of,
    seed_of,
    trait_names,
)
from services.analyzer.documents.models import ProbeStatistics
from services.analyzer.documents.safety_neurons import (
    SAFETY_TOP_FRACTION,
    refusal_direction,
    safety_neuron_errors,
)
from services.analyzer.geometry import (
    SAFETY_DEPTHS,
    SAFETY_N_LAYERS,
    depth_layer,
    safety_layers,
    snap_layer,
)
from services.analyzer.loading import Extraction, RunArtefacts
from services.analyzer.views import PROBE_METRICS, ProbeView
from services.common.methodologies import methodology_info
from services.common.precisions import bits

__all__ = ["probe_statistics", "safety_section"]


def _probe_compare(ref: ProbeView, var: ProbeView, resamples: int, seed: int) -> dict[str, Any]:
    common = sorted(set(ref.per_prompt) & set(var.per_prompt))
    metrics: dict[str, Any] = {}
    for m in PROBE_METRICS:
        a = [ref.per_prompt[q][m] for q in common]
        b = [var.per_prompt[q][m] for q in common]
        ra = [x[m] for x in ref.per_prompt.values()]
        vb = [x[m] for x in var.per_prompt.values()]
        metrics[m] = {
            "reference": ref.aggregate.get(m),
            "variant": var.aggregate.get(m),
            "shift": None
            if ref.aggregate.get(m) is None or var.aggregate.get(m) is None
            else var.aggregate[m] - ref.aggregate[m],  # type: ignore[operator]
            "shift_paired": stats.bootstrap_diff(
                b, a, paired=True, resamples=resamples, seed=seed_of(seed, m)
            ).to_json(),
            "pearson": stats.pearson(a, b).to_json(),
            "spearman": stats.spearman(a, b).to_json(),
            "mann_whitney": stats.mann_whitney(vb, ra).to_json(),
        }
    refusal: dict[str, Any] = {}
    for name, view in (("reference", ref), ("variant", var)):
        if view.refused:
            refusal[name] = stats.wilson(sum(view.refused.values()), len(view.refused)).to_json()
        else:
            refusal[name] = {
                "value": view.refusal_rate,
                "low": view.refusal_low,
                "high": view.refusal_high,
                "n": view.n,
                "method": "as reported by the probe result",
            }
    shared = sorted(set(ref.refused) & set(var.refused))
    if shared:
        refusal["shift"] = stats.bootstrap_diff(
            [float(var.refused[q]) for q in shared],
            [float(ref.refused[q]) for q in shared],
            paired=True,
            resamples=resamples,
            seed=seed_of(seed, "refusal"),
        ).to_json()
        refusal["mcnemar"] = stats.mcnemar(
            [var.refused[q] for q in shared], [ref.refused[q] for q in shared]
        ).to_json()
    elif ref.refusal_rate is not None and var.refusal_rate is not None:
        refusal["shift"] = {"value": var.refusal_rate - ref.refusal_rate, "low": None, "high": None}
    calibration = {
        k: {
            "reference": ref.calibration.get(k),
            "variant": var.calibration.get(k),
            "shift": None
            if ref.calibration.get(k) is None or var.calibration.get(k) is None
            else var.calibration[k] - ref.calibration[k],  # type: ignore[operator]
        }
        for k in ("ece", "brier", "mean_confidence")
    }
    return {
        "n_shared_prompts": len(common),
        "metrics": metrics,
        "refusal_rate": refusal,
        "calibration": calibration,
        "prefix_diversity": {"reference": ref.prefix_diversity, "variant": var.prefix_diversity},
        "top_prefix_share": {"reference": ref.top_prefix_share, "variant": var.top_prefix_share},
    }


def _probe_entries(run: RunArtefacts, resamples: int, base_seed: int) -> list[dict[str, Any]]:
    """One entry per probe result; variants carry their comparison with the reference."""
    probes: list[dict[str, Any]] = []
    for (model, name), ref_id, ref, v in against_reference(run, run.probes, lambda v: (v.name,)):
        entry: dict[str, Any] = {
            "model": model,
            "probe": name,
            "variant": v.variant,
            "precision": precision_of(v.variant),
            "n": v.n,
            "aggregate": v.aggregate,
            "refusal_rate": {
                "value": v.refusal_rate,
                "low": v.refusal_low,
                "high": v.refusal_high,
            },
            "calibration": v.calibration,
            "prefix_diversity": v.prefix_diversity,
            "is_reference": v.variant == ref_id,
            "sources": {"result": v.key, "reference": ref.key if ref else None},
        }
        if ref is not None and v.variant != ref_id:
            entry["comparison"] = _probe_compare(
                ref, v, resamples, seed_of(base_seed, cell_id(run, v.key))
            )
        probes.append(entry)
    return probes


def _refusal_and_neurons(
    run: RunArtefacts, resamples: int, base_seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Refusal-direction cosines and safety-neuron errors of every variant vs its reference."""
    spec = run.spec
    refusal: list[dict[str, Any]] = []
    neurons: list[dict[str, Any]] = []
    arditi = [
        t
        for t, methodology, _ in trait_names(run)
        if methodology_info(methodology).harmful_instructions
    ]
    for model in run.models():
        ref_id = run.reference_of(model)
        for trait in arditi:
            ref_ex = run.extractions.get((ref_id, trait, "native"))
            if ref_ex is None:
                continue
            n_layers = ref_ex.num_layers
            wanted = depth_layer(spec.analysis.refusal_depth, n_layers)
            layer = snap_layer(wanted, ref_ex.summary.layers)
            s_layers = safety_layers(ref_ex.summary.layers, n_layers)
            for pv in run.variants:
                if pv.model.name != model or pv.id == ref_id:
                    continue
                ex: Extraction | None = run.extractions.get((pv.id, trait, "native"))
                if ex is None:
                    continue
                if "mean_diff" in ref_ex.vectors and "mean_diff" in ex.vectors:
                    rd = refusal_direction(
                        ref_ex.vectors["mean_diff"], ex.vectors["mean_diff"], layer
                    )
                    refusal.append(
                        {
                            "model": model,
                            "trait": trait,
                            "variant": pv.id,
                            "precision": pv.precision.value,
                            "depth": spec.analysis.refusal_depth,
                            "requested_layer": wanted,
                            **rd,
                            "classification": classify_cosine(rd["cosine"]).to_json(),
                            "sources": {
                                "reference": ref_ex.vector_keys["mean_diff"],
                                "variant": ex.vector_keys["mean_diff"],
                            },
                        }
                    )
                if ref_ex.activations is not None and ex.activations is not None:
                    res = safety_neuron_errors(
                        ref_ex.activations,
                        ex.activations,
                        s_layers,
                        resamples=resamples,
                        seed=seed_of(base_seed, "neurons", pv.id, trait),
                    )
                    neurons.append(
                        {
                            "model": model,
                            "trait": trait,
                            "variant": pv.id,
                            "precision": pv.precision.value,
                            **res,
                            "sources": {
                                "reference": ref_ex.activations.key,
                                "variant": ex.activations.key,
                            },
                        }
                    )
    return refusal, neurons


def _across_variants(
    probes: list[dict[str, Any]], refusal: list[dict[str, Any]], neurons: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Do geometry and behaviour move together? Correlations and 4-bit vs wider groups."""
    shift_by_variant: dict[str, float] = {}
    entropy_by_variant: dict[str, float] = {}
    for row in probes:
        cmp = row.get("comparison")
        if not cmp:
            continue
        shift = (cmp["refusal_rate"].get("shift") or {}).get("value")
        if shift is not None:
            shift_by_variant[row["variant"]] = shift
        ent = cmp["metrics"]["entropy"]["shift"]
        if ent is not None:
            entropy_by_variant[row["variant"]] = ent
    cos_by_variant = {r["variant"]: r["cosine"] for r in refusal if r["cosine"] is not None}
    ratio_by_variant = {
        n["variant"]: n["ratio"]["value"]
        for n in neurons
        if isinstance(n.get("ratio"), Mapping) and n["ratio"].get("value") is not None
    }
    across: list[dict[str, Any]] = []
    for x_name, xs, y_name, ys in (
        ("refusal_direction_cosine", cos_by_variant, "refusal_rate_shift", shift_by_variant),
        ("safety_neuron_error_ratio", ratio_by_variant, "refusal_rate_shift", shift_by_variant),
        ("entropy_shift", entropy_by_variant, "refusal_rate_shift", shift_by_variant),
    ):
        common = sorted(set(xs) & set(ys))
        across.append(
            {
                "x": x_name,
                "y": y_name,
                "variants": common,
                "pearson": stats.pearson(
                    [xs[c] for c in common], [ys[c] for c in common]
                ).to_json(),
                "spearman": stats.spearman(
                    [xs[c] for c in common], [ys[c] for c in common]
                ).to_json(),
            }
        )
    groups: list[dict[str, Any]] = []
    for name, values in (
        ("refusal_direction_cosine", cos_by_variant),
        ("safety_neuron_error_ratio", ratio_by_variant),
        ("refusal_rate_shift", shift_by_variant),
    ):
        four = [x for v, x in values.items() if bits(precision_of(v)) <= 4]
        wide = [x for v, x in values.items() if bits(precision_of(v)) > 4]
        groups.append(
            {
                "metric": name,
                "groups": {"4-bit": len(four), "8-bit and wider": len(wide)},
                "mann_whitney": stats.mann_whitney(four, wide).to_json(),
            }
        )
    return across, groups


def probe_statistics(run: RunArtefacts) -> ProbeStatistics:
    """``probe_statistics.json``: probe shifts, refusal direction, safety neurons, correlations."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, content_seed(run)
    probes = _probe_entries(run, resamples, base_seed)
    refusal, neurons = _refusal_and_neurons(run, resamples, base_seed)
    across, groups = _across_variants(probes, refusal, neurons)
    return ProbeStatistics.model_validate(
        {
            "run_id": run.run_id,
            "reference_precision": run.reference,
            "refusal_depth": spec.analysis.refusal_depth,
            "safety_neurons": {
                "depths": list(SAFETY_DEPTHS),
                "layers": SAFETY_N_LAYERS,
                "top_fraction": SAFETY_TOP_FRACTION,
            },
            "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
            "probes": probes,
            "refusal_direction": refusal,
            "safety_neuron_errors": neurons,
            "across_variants": across,
            "precision_groups": groups,
        }
    )


# ---------------------------------------------------------------------------------------------


def safety_section(doc: ProbeStatistics) -> list[Block]:
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
    for e in doc.probes:
        cmp = e.comparison
        if not cmp:
            continue
        m = cmp["metrics"]
        rr = cmp["refusal_rate"]
        rows.append(
            (
                e.model,
                e.variant,
                str(cmp["n_shared_prompts"]),
                fmt_est(m["entropy"]["shift_paired"]),
                fmt_est(m["top1"]["shift_paired"]),
                fmt_num((m["entropy"]["spearman"] or {}).get("statistic")),
                f"{fmt_est(rr.get('reference'))} → {fmt_est(rr.get('variant'))}",
                fmt_est(rr.get("shift")),
                fmt_p((rr.get("mcnemar") or {}).get("p_value")),
                fmt_num(cmp["calibration"]["ece"]["shift"]),
                f"{fmt_num(cmp['prefix_diversity']['reference'], 2)} → {fmt_num(cmp['prefix_diversity']['variant'], 2)}",
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
    blocks += _refusal_blocks(doc)
    blocks += _neuron_blocks(doc)
    blocks += _across_blocks(doc)
    return blocks


def _refusal_blocks(doc: ProbeStatistics) -> list[Block]:
    """The refusal-direction table."""
    blocks: list[Block] = []
    refusal = doc.refusal_direction
    blocks.append(Heading(3, "Refusal direction", "refusal-direction"))
    if refusal:
        blocks.append(
            Table(
                ("model", "trait", "variant", "layer", "cosine", "norm ratio", "class"),
                tuple(
                    (
                        r.model,
                        r.trait,
                        r.variant,
                        f"{r.layer} (depth {doc.refusal_depth:g})",
                        fmt_num(r.cosine),
                        fmt_num(r.norm_ratio),
                        badge(r.classification),
                    )
                    for r in refusal
                ),
                "mean_diff refusal direction (Arditi et al. 2024) at the layer nearest the "
                "configured depth; classified with the vector-cosine thresholds.",
            )
        )
    else:
        blocks.append(Paragraph("No refusal (arditi) trait with reference and variant vectors."))
    return blocks


def _neuron_blocks(doc: ProbeStatistics) -> list[Block]:
    """The safety-neuron error table."""
    blocks: list[Block] = []
    neurons = doc.safety_neuron_errors
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
                        n.model,
                        n.variant,
                        ", ".join(str(x) for x in n.layers),
                        str(n.n),
                        fmt_est(n.ratio),
                        fmt_test(n.t_test),
                        fmt_est(n.relative_ratio),
                        fmt_test(n.relative_t_test),
                    )
                    for n in neurons
                ),
            )
        )
    else:
        blocks.append(
            Paragraph("No safety-neuron analysis (no stored activations of a refusal trait).")
        )
    return blocks


def _across_blocks(doc: ProbeStatistics) -> list[Block]:
    """Correlations across variants and the precision groups."""
    blocks: list[Block] = []
    across = doc.across_variants
    if across:
        blocks.append(Heading(3, "Across variants", "across-variants"))
        blocks.append(
            Table(
                ("x", "y", "variants", "Pearson r", "Spearman ρ"),
                tuple(
                    (
                        a.x,
                        a.y,
                        str(len(a.variants)),
                        fmt_test(a.pearson),
                        fmt_test(a.spearman),
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
                        g.metric,
                        f"{g.groups['4-bit']} / {g.groups['8-bit and wider']}",
                        fmt_test(g.mann_whitney),
                    )
                    for g in doc.precision_groups
                ),
                "Variants grouped by bit width (GPTQ and AWQ counted as 4-bit); the test needs "
                "both groups.",
            )
        )
    return blocks
