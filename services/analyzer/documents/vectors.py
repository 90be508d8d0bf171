"""``vector_comparison.json``: per-layer cosine, norms and massive-dim energy, and its report section."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from services.analyzer.blocks import (
    Block,
    Cell,
    Details,
    Heading,
    Paragraph,
    Table,
    badge,
    figure_blocks,
    fmt_num,
)
from services.analyzer.classify import (
    THRESHOLDS,
    classify_cosine,
)
from services.analyzer.documents.common import (
    finite,
    mean_of,
    precision_of,
    trait_names,
)
from services.analyzer.documents.models import VectorComparison
from services.analyzer.documents.refusals import extraction_refusals, refusal_blocks
from services.analyzer.figures import FigureImage
from services.analyzer.geometry import (
    layer_window,
)
from services.analyzer.loading import Extraction, RunArtefacts
from services.common.contracts.vectors import VectorSet

__all__ = ["compare_vectors", "vector_comparison", "vectors_section"]


def compare_vectors(
    reference: VectorSet, variant: VectorSet, window: Sequence[int]
) -> dict[str, Any]:
    """Per-layer cosine, norm ratio (variant / reference) and massive-dim energy of two sets.

    Layers are those both sets captured. A layer where either vector has zero norm (or came
    from non-finite activations) has a null cosine and is listed in ``null_layers``; it never
    raises. The ``window`` summary averages over the window's layers that have a value.
    """
    layers = [layer for layer in reference.layers if layer in variant.layers]
    cosine: list[float | None] = []
    ratio: list[float | None] = []
    ref_norm: list[float | None] = []
    var_norm: list[float | None] = []
    energy_ref: list[float | None] = []
    energy_var: list[float | None] = []
    shared: list[float | None] = []
    auroc_ref: list[float | None] = []
    auroc_var: list[float | None] = []
    null_layers: list[dict[str, Any]] = []
    for layer in layers:
        i, j = reference.layers.index(layer), variant.layers.index(layer)
        a = reference.vectors[i].astype(np.float64)
        b = variant.vectors[j].astype(np.float64)
        all_finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        na = float(np.linalg.norm(a)) if all_finite else 0.0
        nb = float(np.linalg.norm(b)) if all_finite else 0.0
        reasons = _null_reasons(
            (bool(reference.nonfinite[i]) or not np.isfinite(a).all(), na == 0.0),
            (bool(variant.nonfinite[j]) or not np.isfinite(b).all(), nb == 0.0),
            (bool(reference.zero_norm[i]), bool(variant.zero_norm[j])),
        )
        if reasons:
            cosine.append(None)
            null_layers.append({"layer": layer, "reason": "; ".join(reasons)})
        else:
            cosine.append(float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0)))
        ratio.append(nb / na if na > 0 and all_finite else None)
        ref_norm.append(finite(na))
        var_norm.append(finite(nb))
        energy_ref.append(finite(reference.massive_dim_energy[i]))
        energy_var.append(finite(variant.massive_dim_energy[j]))
        da = {int(x) for x in reference.massive_dims[i]}
        db = {int(x) for x in variant.massive_dims[j]}
        shared.append(len(da & db) / len(da) if da else None)
        auroc_ref.append(finite(reference.auroc[i]))
        auroc_var.append(finite(variant.auroc[j]))
    in_window = [k for k, layer in enumerate(layers) if layer in set(window)]

    def wmean(values: list[float | None]) -> float | None:
        return mean_of(values[k] for k in in_window)

    window_cos = [c for c in (cosine[k] for k in in_window) if c is not None]
    return {
        "layers": layers,
        "cosine": cosine,
        "norm_ratio": ratio,
        "reference_norm": ref_norm,
        "variant_norm": var_norm,
        "massive_dim_energy": {"reference": energy_ref, "variant": energy_var},
        "massive_dims_shared": shared,
        "auroc": {"reference": auroc_ref, "variant": auroc_var},
        "null_layers": null_layers,
        "window": {
            "layers": [layers[k] for k in in_window],
            "n_layers_with_cosine": len(window_cos),
            "mean_cosine": wmean(cosine),
            "min_cosine": min(window_cos) if window_cos else None,
            "mean_norm_ratio": wmean(ratio),
            "mean_massive_dim_energy": {
                "reference": wmean(energy_ref),
                "variant": wmean(energy_var),
            },
            "mean_auroc": {"reference": wmean(auroc_ref), "variant": wmean(auroc_var)},
        },
    }


def _null_reasons(
    reference: tuple[bool, bool], variant: tuple[bool, bool], stored_zero: tuple[bool, bool]
) -> list[str]:
    """Why a layer has no cosine: each side's (non-finite, zero computed norm) and the zero-norm
    flags stored with the (reference, variant) sets."""
    reasons = []
    if reference[0]:
        reasons.append("non-finite reference activations")
    if variant[0]:
        reasons.append("non-finite variant activations")
    if stored_zero[0] or reference[1]:
        reasons.append("zero-norm reference vector")
    if stored_zero[1] or variant[1]:
        reasons.append("zero-norm variant vector")
    return reasons


def _primary_mode(run: RunArtefacts, variant: str, trait: str) -> str | None:
    for mode in ("replay", "native"):
        if (variant, trait, mode) in run.extractions:
            return mode
    return None


def _variant_entries(
    run: RunArtefacts,
    base: dict[str, Any],
    ref_ex: Extraction,
    others: list[str],
    window: list[int],
    missing: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each variant's vectors (every vector mode) against the reference's, classified."""
    trait, method = base["trait"], base["method"]
    entries: list[dict[str, Any]] = []
    for variant in others:
        primary = _primary_mode(run, variant, trait)
        if primary is None:
            missing.append({**base, "variant": variant, "reason": "no extraction"})
            continue
        for mode in ("replay", "native"):
            ex = run.extractions.get((variant, trait, mode))
            if ex is None or method not in ex.vectors:
                continue
            cmp = compare_vectors(ref_ex.vectors[method], ex.vectors[method], window)
            w = cmp["window"]
            entries.append(
                {
                    **base,
                    "variant": variant,
                    "precision": precision_of(variant),
                    "mode": mode,
                    "primary": mode == primary,
                    **cmp,
                    "classification": classify_cosine(w["mean_cosine"]).to_json(),
                    "n_train": [ex.summary.n_train_pos, ex.summary.n_train_neg],
                    "n_val": [ex.summary.n_val_pos, ex.summary.n_val_neg],
                    "sources": {
                        "reference": ref_ex.vector_keys[method],
                        "variant": ex.vector_keys[method],
                    },
                }
            )
    return entries


def _pair_entries(
    run: RunArtefacts, base: dict[str, Any], ids: list[str], window: list[int]
) -> list[dict[str, Any]]:
    """Every other pair of variants (primary modes), unclassified."""
    trait, method, ref = base["trait"], base["method"], base["reference"]
    pairs: list[dict[str, Any]] = []
    for a_i, a in enumerate(ids):
        for b in ids[a_i + 1 :]:
            if a == ref:
                continue
            ma, mb = _primary_mode(run, a, trait), _primary_mode(run, b, trait)
            if ma is None or mb is None:
                continue
            ea, eb = run.extractions[(a, trait, ma)], run.extractions[(b, trait, mb)]
            if method not in ea.vectors or method not in eb.vectors:
                continue
            cmp = compare_vectors(ea.vectors[method], eb.vectors[method], window)
            pairs.append(
                {
                    **base,
                    "a": a,
                    "a_mode": ma,
                    "b": b,
                    "b_mode": mb,
                    "layers": cmp["layers"],
                    "cosine": cmp["cosine"],
                    "norm_ratio": cmp["norm_ratio"],
                    "mean_cosine": cmp["window"]["mean_cosine"],
                    "mean_norm_ratio": cmp["window"]["mean_norm_ratio"],
                    "sources": {
                        "a": ea.vector_keys[method],
                        "b": eb.vector_keys[method],
                    },
                }
            )
    return pairs


def vector_comparison(run: RunArtefacts) -> VectorComparison:
    """``vector_comparison.json``: every model x trait x method x position, every variant pair."""
    spec = run.spec
    entries: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for model in run.models():
        ref = run.reference_of(model)
        others = [v.id for v in run.variants if v.model.name == model and v.id != ref]
        for trait, methodology, position in trait_names(run):
            ref_ex = run.extractions.get((ref, trait, "native"))
            if ref_ex is None:
                missing.append(
                    {"model": model, "trait": trait, "reason": f"no extraction of {ref}"}
                )
                continue
            window = layer_window(
                ref_ex.summary.layers, ref_ex.num_layers, spec.analysis.layer_range
            )
            for method in spec.methods:
                if method not in ref_ex.vectors:
                    missing.append(
                        {
                            "model": model,
                            "trait": trait,
                            "method": method,
                            "reason": "no reference vectors",
                        }
                    )
                    continue
                base = {
                    "model": model,
                    "trait": trait,
                    "methodology": methodology,
                    "method": method,
                    "position": position,
                    "reference": ref,
                    "num_layers": ref_ex.num_layers,
                }
                entries += _variant_entries(run, base, ref_ex, others, window, missing)
                # How quantized variants agree with each other.
                pairs += _pair_entries(run, base, [ref, *others], window)
    return VectorComparison.model_validate(
        {
            "run_id": run.run_id,
            "reference_precision": run.reference,
            "layer_range": list(spec.analysis.layer_range),
            "threshold": THRESHOLDS["vector_cosine"].to_json(),
            "entries": entries,
            "pairs": pairs,
            "missing": missing,
            "extraction_refusals": extraction_refusals(run),
        }
    )


# ---------------------------------------------------------------------------------------------


def vectors_section(doc: VectorComparison, figures: Sequence[FigureImage]) -> list[Block]:
    lo, hi = doc.layer_range
    blocks: list[Block] = [
        Heading(2, "Vector geometry", "vectors"),
        Paragraph(
            f"Cosine between each variant's trait vector and the reference's "
            f"({doc.reference_precision}) per layer; the mean is over captured layers at "
            f"depths {lo:g}–{hi:g}. Norm ratio is variant / reference. Massive-dimension energy "
            "is the share of the vector's squared norm in the layer's four largest-activation "
            "dimensions. Source: analysis/vector_comparison.json (`entries`; inputs in "
            "`sources`)."
        ),
    ]
    blocks += figure_blocks(figures, "cosine-heatmap")
    rows: list[tuple[Cell, ...]] = []
    for e in doc.entries:
        w = e.window
        rows.append(
            (
                e.model,
                e.trait,
                e.method,
                e.position,
                e.variant,
                e.mode + ("" if e.primary else " (2nd)"),
                fmt_num(w.mean_cosine),
                fmt_num(w.min_cosine),
                fmt_num(w.mean_norm_ratio),
                f"{fmt_num(w.mean_massive_dim_energy.reference, 2)} / "
                f"{fmt_num(w.mean_massive_dim_energy.variant, 2)}",
                f"{fmt_num(w.mean_auroc.reference, 2)} / {fmt_num(w.mean_auroc.variant, 2)}",
                str(len(e.null_layers)),
                badge(e.classification),
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
    blocks += figure_blocks(figures, "layer-cosine")
    blocks += figure_blocks(figures, "model-spread")
    return blocks + _pair_blocks(doc) + refusal_blocks(doc.extraction_refusals)


def _pair_blocks(doc: VectorComparison) -> list[Block]:
    """The collapsed table of quantized variants against each other, when there are any."""
    blocks: list[Block] = []
    pairs = doc.pairs
    if pairs:
        blocks.append(
            Details(
                f"Quantized variants against each other ({len(pairs)} pairs)",
                [
                    Table(
                        ("model", "trait", "method", "a", "b", "mean cos", "norm ratio"),
                        tuple(
                            (
                                p.model,
                                p.trait,
                                p.method,
                                f"{p.a} ({p.a_mode})",
                                f"{p.b} ({p.b_mode})",
                                fmt_num(p.mean_cosine),
                                fmt_num(p.mean_norm_ratio),
                            )
                            for p in pairs
                        ),
                        "Unclassified: thresholds apply to comparisons with the reference.",
                    )
                ],
            )
        )
    return blocks
