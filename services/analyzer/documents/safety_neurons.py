"""Refusal direction and safety-neuron reconstruction errors across precisions (for ``probe_statistics.json``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.analyzer import stats
from services.analyzer.documents.common import (
    finite,
)
from services.analyzer.documents.vectors import compare_vectors
from services.analyzer.loading import (
    Activations,
)
from services.common.contracts.vectors import VectorSet

__all__ = [
    "SAFETY_TOP_FRACTION",
    "aligned_rows",
    "refusal_direction",
    "safety_neuron_errors",
    "subset_layers",
]


SAFETY_TOP_FRACTION = 0.05


def refusal_direction(reference: VectorSet, variant: VectorSet, layer: int) -> dict[str, Any]:
    """Cosine and norm ratio of two mean_diff refusal directions at ``layer``."""
    cmp = compare_vectors(reference, variant, [layer])
    k = cmp["layers"].index(layer) if layer in cmp["layers"] else None
    if k is None:
        return {"layer": layer, "cosine": None, "norm_ratio": None, "reason": "layer not captured"}
    out: dict[str, Any] = {
        "layer": layer,
        "cosine": cmp["cosine"][k],
        "norm_ratio": cmp["norm_ratio"][k],
        "reference_norm": cmp["reference_norm"][k],
        "variant_norm": cmp["variant_norm"][k],
    }
    if cmp["null_layers"]:
        out["reason"] = cmp["null_layers"][0]["reason"]
    return out


def aligned_rows(
    ref: Activations, var: Activations
) -> tuple[NDArray[np.float32], NDArray[np.float32], dict[str, Any]]:
    """Rows of both activation sets for the same inputs, matched by (group, pair id)."""
    ref_rows: list[NDArray[np.float32]] = []
    var_rows: list[NDArray[np.float32]] = []
    info: dict[str, Any] = {
        "matched": 0,
        "reference_only": 0,
        "variant_only": 0,
        "reordered": False,
    }
    layer_idx_var = [var.layers.index(layer) for layer in ref.layers if layer in var.layers]
    layer_idx_ref = [k for k, layer in enumerate(ref.layers) if layer in var.layers]
    for group in ("train_pos", "train_neg", "val_pos", "val_neg"):
        if group not in ref.groups or group not in var.groups:
            continue
        rid = ref.pair_ids.get(group, [str(i) for i in range(len(ref.groups[group]))])
        vid = var.pair_ids.get(group, [str(i) for i in range(len(var.groups[group]))])
        if rid != vid:
            info["reordered"] = True
        vpos = {p: i for i, p in enumerate(vid)}
        for i, p in enumerate(rid):
            j = vpos.get(p)
            if j is None:
                info["reference_only"] += 1
                continue
            ref_rows.append(ref.groups[group][i][layer_idx_ref])
            var_rows.append(var.groups[group][j][layer_idx_var])
            info["matched"] += 1
        info["variant_only"] += len(set(vid) - set(rid))
    if not ref_rows:
        shape = (0, len(layer_idx_ref), ref.groups["train_pos"].shape[-1] if ref.groups else 0)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32), info
    return np.stack(ref_rows), np.stack(var_rows), info


def safety_neuron_errors(
    reference: Activations,
    variant: Activations,
    layers: Sequence[int],
    *,
    top_fraction: float = SAFETY_TOP_FRACTION,
    resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Quantization error on safety neurons vs the other neurons, per input.

    Safety neurons: at each of ``layers``, the ``top_fraction`` of dimensions with the largest
    contrast ``|mean(harmful) - mean(harmless)|`` on the *reference's* training activations
    (harmful = ``train_pos``). Error per input and dimension: ``|a_variant - a_reference|`` on
    the same input (rows matched by pair id). Per input, the ratio is the mean error over safety
    neurons divided by the mean error over the other neurons (all ``layers`` pooled); a
    one-sample t-test asks whether the ratio exceeds 1. ``relative_ratio`` divides each error
    by the reference's mean ``|activation|`` of that dimension first, so a ratio driven only by
    safety neurons being larger is visible.
    """
    keep = [layer for layer in layers if layer in reference.layers and layer in variant.layers]
    sub_ref = subset_layers(reference, keep)
    sub_var = subset_layers(variant, keep)
    out: dict[str, Any] = {"layers": keep, "top_fraction": top_fraction}
    if not {"train_pos", "train_neg"} <= set(sub_ref.groups) or not keep:
        return {**out, "n": 0, "reason": "no reference training activations at these layers"}
    a_ref, a_var, align = aligned_rows(sub_ref, sub_var)
    out["alignment"] = align
    if a_ref.shape[0] < 2:
        return {**out, "n": int(a_ref.shape[0]), "reason": "fewer than 2 matched inputs"}
    harmful = sub_ref.groups["train_pos"].astype(np.float64)
    harmless = sub_ref.groups["train_neg"].astype(np.float64)
    contrast = np.abs(harmful.mean(axis=0) - harmless.mean(axis=0))  # [L', H]
    hidden = contrast.shape[1]
    k = max(1, round(top_fraction * hidden))
    top = np.argsort(-contrast, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(contrast, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    err = np.abs(a_var.astype(np.float64) - a_ref.astype(np.float64))  # [n, L', H]
    scale = np.abs(a_ref.astype(np.float64)).mean(axis=0)  # [L', H]
    rel = np.divide(err, scale[None], out=np.zeros_like(err), where=scale[None] > 0)
    safety_err = err[:, mask].mean(axis=1)
    other_err = err[:, ~mask].mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(other_err > 0, safety_err / other_err, np.nan)
        rel_ratio = np.where(
            rel[:, ~mask].mean(axis=1) > 0,
            rel[:, mask].mean(axis=1) / rel[:, ~mask].mean(axis=1),
            np.nan,
        )
    per_layer = []
    for li, layer in enumerate(keep):
        s = err[:, li][:, mask[li]].mean(axis=1)
        o = err[:, li][:, ~mask[li]].mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(o > 0, s / o, np.nan)
        per_layer.append(
            {
                "layer": layer,
                "mean_ratio": finite(np.nanmean(r)) if np.isfinite(r).any() else None,
                "mean_error_safety": finite(s.mean()),
                "mean_error_other": finite(o.mean()),
            }
        )
    return {
        **out,
        "n": int(a_ref.shape[0]),
        "neurons_per_layer": k,
        "hidden_size": hidden,
        "mean_error_safety": finite(safety_err.mean()),
        "mean_error_other": finite(other_err.mean()),
        "ratio": stats.bootstrap(ratio, resamples=resamples, seed=seed).to_json(),
        "relative_ratio": stats.bootstrap(rel_ratio, resamples=resamples, seed=seed + 1).to_json(),
        "t_test": stats.one_sample_t(ratio, 1.0, alternative="greater").to_json(),
        "relative_t_test": stats.one_sample_t(rel_ratio, 1.0, alternative="greater").to_json(),
        "mann_whitney": stats.mann_whitney(safety_err, other_err, alternative="greater").to_json(),
        "per_layer": per_layer,
    }


def subset_layers(acts: Activations, layers: Sequence[int]) -> Activations:
    idx = [acts.layers.index(layer) for layer in layers if layer in acts.layers]
    return Activations(
        key=acts.key,
        layers=tuple(acts.layers[i] for i in idx),
        groups={k: v[:, idx] for k, v in acts.groups.items()},
        pair_ids=acts.pair_ids,
    )
