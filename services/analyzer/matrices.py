"""The comparison matrices: pure functions from loaded artefacts to the analysis JSON documents.

Each builder takes a :class:`~services.analyzer.loading.RunArtefacts` (or plain vectors and
arrays, for the per-cell math) and returns JSON-ready dicts; nothing here touches the store, so
every number can be checked on planted data. Every cell names the S3 keys it was computed from
(``sources``), and every classified cell carries its value, interval and class
(:mod:`services.analyzer.classify`).

Conventions:

* The *reference* of a model is ``<model>@<spec.reference>``; its vectors come from its native
  extraction. A variant's *primary* vector mode is the one its steering used (``replay`` when
  the run has it, else ``native``); both modes are compared when both exist.
* *Depth* of layer ``l`` is ``l / (num_layers - 1)``; the layer window of the mean cosine is the
  captured layers with depth in ``analysis.layer_range`` (inclusive).
* Bootstraps resample units (questions, items, prompts) with ``steering.bootstrap`` resamples;
  each cell's seed is derived from ``steering.seed``, the spec's fingerprint and the cell's
  identity (never the run id), so results do not depend on the order cells are computed in and
  identical inputs rerun under another run id give identical intervals.
* Steering effect is the delta in the steered direction (``+delta`` for ``+``, ``-delta`` for
  ``-`` and ablation); degradation is ``(effect_ref - effect_variant) / effect_ref`` in %,
  undefined when the reference effect is not positive.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from services.analyzer import stats
from services.analyzer.classify import (
    THRESHOLDS,
    classify_benchmark_drop,
    classify_cosine,
    classify_logit_correlation,
    classify_steering_degradation,
)
from services.analyzer.loading import (
    PROBE_METRICS,
    Activations,
    BenchmarkView,
    Extraction,
    LogitDiffView,
    ProbeView,
    RunArtefacts,
    SteerRun,
    SteerView,
    depth_layer,
)
from services.common.hashing import stable_hash
from services.extractor.methods import VectorSet

__all__ = [
    "PRECISION_BITS",
    "SCHEMA",
    "benchmark_comparison",
    "build_all",
    "compare_vectors",
    "layer_window",
    "logit_diff_comparison",
    "probe_statistics",
    "refusal_direction",
    "robustness_ranking",
    "safety_layers",
    "safety_neuron_errors",
    "snap_layer",
    "steering_comparison",
    "vector_comparison",
]

SCHEMA = "qsens.analysis/1"
F64 = NDArray[np.float64]
# Bit width of each precision for the grouped tests (GPTQ/AWQ checkpoints are assumed 4-bit).
PRECISION_BITS: dict[str, int] = {
    "fp32": 32,
    "bf16": 16,
    "fp16": 16,
    "int8": 8,
    "nf4": 4,
    "fp4": 4,
    "gptq": 4,
    "awq": 4,
}
SAFETY_DEPTHS = (0.2, 0.8)
SAFETY_N_LAYERS = 5
SAFETY_TOP_FRACTION = 0.05
MATCH_TOLERANCE = 0.15  # relative coefficient gap accepted as "the same coefficient"


# ---------------------------------------------------------------------------------------------
# Helpers.


def _f(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _seed(base: int, *parts: Any) -> int:
    return int(stable_hash([base, *[str(p) for p in parts]], 8), 16)


def _content_seed(run: RunArtefacts) -> int:
    """The base of every cell seed: ``steering.seed`` and the spec's fingerprint, never the run id.

    Cells add their identity (:func:`_cell`), so identical inputs analysed under two run ids
    get identical intervals.
    """
    return _seed(run.spec.steering.seed, run.spec.fingerprint())


def _cell(run: RunArtefacts, key: str) -> str:
    """A result key's identity within its run: the key without ``runs/<run_id>/``."""
    return key.removeprefix(f"runs/{run.run_id}/")


def _model_of(variant: str) -> str:
    return variant.partition("@")[0]


def _precision_of(variant: str) -> str:
    return variant.partition("@")[2]


class _OfVariant(Protocol):
    @property
    def variant(self) -> str: ...


_V = TypeVar("_V", bound=_OfVariant)


def _against_reference(
    run: RunArtefacts, views: Iterable[_V], cell: Callable[[_V], tuple[str, ...]]
) -> Iterable[tuple[tuple[str, ...], str, _V | None, _V]]:
    """Views grouped into cells ``(model, *cell(view))`` in sorted order, variants sorted in
    each: ``(cell, reference variant id, the cell's reference view or None, view)``."""
    by_cell: dict[tuple[str, ...], list[_V]] = defaultdict(list)
    for v in views:
        by_cell[(_model_of(v.variant), *cell(v))].append(v)
    for key, group in sorted(by_cell.items()):
        ref_id = run.reference_of(key[0])
        ref = next((v for v in group if v.variant == ref_id), None)
        for v in sorted(group, key=lambda x: x.variant):
            yield key, ref_id, ref, v


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def snap_layer(layer: int, layers: Sequence[int]) -> int:
    """The captured layer nearest to ``layer`` (the shallower one on a tie)."""
    if not layers:
        raise ValueError("no captured layers")
    return min(layers, key=lambda x: (abs(x - layer), x))


def layer_window(
    layers: Sequence[int], num_layers: int, layer_range: tuple[float, float]
) -> list[int]:
    """Captured layers whose depth ``l / (num_layers - 1)`` lies in ``layer_range`` (inclusive)."""
    lo, hi = layer_range
    denom = max(num_layers - 1, 1)
    return [layer for layer in layers if lo - 1e-9 <= layer / denom <= hi + 1e-9]


def safety_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Five layers evenly spaced between 20% and 80% depth, snapped to captured layers."""
    depths = np.linspace(SAFETY_DEPTHS[0], SAFETY_DEPTHS[1], SAFETY_N_LAYERS)
    return sorted({snap_layer(depth_layer(float(d), num_layers), layers) for d in depths})


# ---------------------------------------------------------------------------------------------
# Vectors.


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
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        na = float(np.linalg.norm(a)) if finite else 0.0
        nb = float(np.linalg.norm(b)) if finite else 0.0
        reasons = []
        if bool(reference.nonfinite[i]) or not np.isfinite(a).all():
            reasons.append("non-finite reference activations")
        if bool(variant.nonfinite[j]) or not np.isfinite(b).all():
            reasons.append("non-finite variant activations")
        if bool(reference.zero_norm[i]) or na == 0.0:
            reasons.append("zero-norm reference vector")
        if bool(variant.zero_norm[j]) or nb == 0.0:
            reasons.append("zero-norm variant vector")
        reasons = list(dict.fromkeys(reasons))
        if reasons:
            cosine.append(None)
            null_layers.append({"layer": layer, "reason": "; ".join(reasons)})
        else:
            cosine.append(float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0)))
        ratio.append(nb / na if na > 0 and finite else None)
        ref_norm.append(_f(na))
        var_norm.append(_f(nb))
        energy_ref.append(_f(reference.massive_dim_energy[i]))
        energy_var.append(_f(variant.massive_dim_energy[j]))
        da = {int(x) for x in reference.massive_dims[i]}
        db = {int(x) for x in variant.massive_dims[j]}
        shared.append(len(da & db) / len(da) if da else None)
        auroc_ref.append(_f(reference.auroc[i]))
        auroc_var.append(_f(variant.auroc[j]))
    in_window = [k for k, layer in enumerate(layers) if layer in set(window)]

    def wmean(values: list[float | None]) -> float | None:
        return _mean(values[k] for k in in_window)

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


def _primary_mode(run: RunArtefacts, variant: str, trait: str) -> str | None:
    for mode in ("replay", "native"):
        if (variant, trait, mode) in run.extractions:
            return mode
    return None


def _trait_names(run: RunArtefacts) -> list[tuple[str, str, str]]:
    """(trait name, methodology, position) of every trait in the spec."""
    spec = run.spec
    return [(spec.trait_name(t), t.methodology, spec.position_for(t)) for t in spec.traits]


def vector_comparison(run: RunArtefacts) -> dict[str, Any]:
    """``vector_comparison.json``: every model x trait x method x position, every variant pair."""
    spec = run.spec
    entries: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for model in run.models():
        ref = run.reference_of(model)
        others = [v.id for v in run.variants if v.model.name == model and v.id != ref]
        for trait, methodology, position in _trait_names(run):
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
                                "precision": _precision_of(variant),
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
                # Every other pair of variants (primary modes): how quantized variants agree
                # with each other, unclassified.
                ids = [ref, *others]
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
    return {
        "schema": SCHEMA,
        "kind": "vector_comparison",
        "run_id": run.run_id,
        "reference_precision": run.reference,
        "layer_range": list(spec.analysis.layer_range),
        "threshold": THRESHOLDS["vector_cosine"].to_json(),
        "entries": entries,
        "pairs": pairs,
        "missing": missing,
    }


# ---------------------------------------------------------------------------------------------
# Steering.


def _effect_sign(view: SteerView) -> float:
    """+1 when the job maximised the trait score, -1 when it minimised it (away, ablation)."""
    return -1.0 if view.objective == "min" else 1.0


def _per_question_effect(view: SteerView) -> dict[str, float] | None:
    """Per question: signed (best - baseline); None without per-question scores."""
    if not view.best_per_question or not view.baseline_per_question:
        return None
    sign = _effect_sign(view)
    out: dict[str, float] = {}
    for q, best in view.best_per_question.items():
        base = view.baseline_per_question.get(q)
        if best is not None and base is not None:
            out[q] = sign * (best - base)
    return out or None


def _degradation(
    ref: SteerView, var: SteerView, resamples: int, seed: int, level: float = stats.DEFAULT_LEVEL
) -> dict[str, Any]:
    """Degradation of the steering effect in %, with a question-bootstrap interval."""
    if ref.delta is None or var.delta is None:
        return {"value": None, "low": None, "high": None, "reason": "no delta"}
    e_ref = _effect_sign(ref) * ref.delta
    e_var = _effect_sign(var) * var.delta
    if e_ref <= 0:
        return {
            "value": None,
            "low": None,
            "high": None,
            "reason": f"the reference's steering effect is {e_ref:.3g} (not positive)",
        }
    if ref.delta_low is not None and ref.delta_high is not None:
        lo, hi = sorted((_effect_sign(ref) * ref.delta_low, _effect_sign(ref) * ref.delta_high))
        if lo <= 0.0:
            # A reference effect indistinguishable from zero makes any % of it meaningless
            # (a -1.8 point delta would turn a 13-point variant effect into "-740%").
            return {
                "value": None,
                "low": None,
                "high": None,
                "reason": f"the reference's steering effect {e_ref:.3g} has a confidence "
                f"interval [{lo:.3g}, {hi:.3g}] that includes 0",
            }
    value = (e_ref - e_var) / e_ref * 100.0
    out: dict[str, Any] = {"value": value, "low": None, "high": None}
    qa, qb = _per_question_effect(ref), _per_question_effect(var)
    if qa is None or qb is None:
        out["ci_method"] = "none (no per-question scores in the steer results)"
        return out
    common = sorted(set(qa) & set(qb))
    rng = np.random.Generator(np.random.PCG64(seed))
    if len(common) >= 2:
        a = np.asarray([qa[q] for q in common])
        b = np.asarray([qb[q] for q in common])
        idx = rng.integers(0, len(common), size=(resamples, len(common)))
        ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
        out["ci_method"] = "percentile-bootstrap over shared questions (paired)"
        out["n"] = len(common)
    else:
        a, b = np.asarray(list(qa.values())), np.asarray(list(qb.values()))
        if a.size < 2 or b.size < 2:
            out["ci_method"] = "none (fewer than 2 questions)"
            return out
        ma = a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
        mb = b[rng.integers(0, b.size, size=(resamples, b.size))].mean(axis=1)
        out["ci_method"] = "percentile-bootstrap over questions (independent)"
        out["n"] = int(min(a.size, b.size))
    valid = ma > 0
    samples = (ma[valid] - mb[valid]) / ma[valid] * 100.0
    out["resamples_with_nonpositive_reference_effect"] = int((~valid).sum())
    if samples.size:
        alpha = (1 - level) / 2
        lo, hi = np.quantile(samples, [alpha, 1 - alpha])
        out["low"], out["high"] = float(lo), float(hi)
    return out


def _run_layer(run: SteerRun) -> int | None:
    return run.layer if run.layer is not None else run.vector_layer


def _matched_coherence(ref: SteerView, var: SteerView) -> dict[str, Any]:
    """The variant's coherence at the reference's best setting.

    Add mode: matched at the same layer on the added norm ``||coefficient * v||`` when both
    results record it (vectors of different variants differ in norm, so equal coefficients are
    not equal interventions), else on the coefficient; the nearest run within
    ``MATCH_TOLERANCE`` (relative) counts as matched. Ablation (coefficient 1 at every layer):
    the variant's run ablating the direction taken from the same layer, preferring the
    reference's question set.
    """
    layer = ref.effective_layer
    if layer is None or ref.best_coefficient is None:
        return {"coherence": None, "reason": "the reference has no best setting"}
    ref_run = next((r for r in ref.runs if r.run_index == ref.best_run_index), None)
    out: dict[str, Any] = {
        "layer": layer,
        "reference_coefficient": ref.best_coefficient,
        "reference_coherence": ref.best_coherence if ref_run is None else ref_run.coherence,
        "tolerance": MATCH_TOLERANCE,
    }
    if ref.mode == "ablate":
        same = [r for r in var.runs if _run_layer(r) == layer]
        if not same:
            return {**out, "coherence": None, "reason": "the variant has no run at that layer"}
        wanted = ref_run.question_set if ref_run is not None else ""
        run = next((r for r in same if r.question_set == wanted), same[0])
        return {
            **out,
            "matched_on": "ablated vector layer",
            "value": 1.0,
            "coefficient": run.coefficient,
            "relative_gap": 0.0,
            "question_set": run.question_set,
            "trait": run.trait,
            "coherence": run.coherence,
        }
    on_norm = (
        ref.best_added_norm is not None
        and ref.best_added_norm > 0
        and any(r.added_norm for r in var.runs)
    )
    target = ref.best_added_norm if on_norm else ref.best_coefficient
    assert target is not None

    def size(r: SteerRun) -> float | None:
        return r.added_norm if on_norm else r.coefficient

    candidates = [r for r in var.runs if r.layer == layer and (size(r) or 0) > 0 and target > 0]
    out.update(
        {"matched_on": "added_norm" if on_norm else "coefficient", "reference_value": target}
    )
    if not candidates:
        return {**out, "coherence": None, "reason": "the variant has no run at that layer"}
    run = min(candidates, key=lambda r: abs(math.log((size(r) or 1.0) / target)))
    gap = (size(run) or 0.0) / target - 1.0
    out.update(
        {
            "value": size(run),
            "coefficient": run.coefficient,
            "relative_gap": gap,
            "trait": run.trait,
        }
    )
    if abs(gap) > MATCH_TOLERANCE:
        return {**out, "coherence": None, "reason": f"nearest run is {gap:+.0%} away"}
    return {**out, "coherence": run.coherence}


def _steer_group_key(v: SteerView) -> tuple[str, str, str, str, str]:
    return (_model_of(v.target), v.trait, v.method, v.mode, v.direction)


def _depth(layer: int | None, num_layers: int | None) -> float | None:
    if layer is None or not num_layers or num_layers < 2:
        return None
    return layer / (num_layers - 1)


def _num_layers(run: RunArtefacts, variant: str, trait: str) -> int | None:
    for mode in ("native", "replay"):
        ex = run.extractions.get((variant, trait, mode))
        if ex is not None:
            return ex.num_layers
    return None


def _spread(
    views: Sequence[SteerView],
    value: Callable[[SteerView], float | None],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """max - min of a per-variant value across precisions, with a question bootstrap."""
    vals = {v.target: value(v) for v in views}
    present = {k: x for k, x in vals.items() if x is not None}
    out: dict[str, Any] = {
        "values": {_precision_of(k): x for k, x in vals.items()},
        "n_precisions": len(present),
    }
    if len(present) < 2:
        return {**out, "spread": None, "low": None, "high": None, "std": None}
    spread = max(present.values()) - min(present.values())
    out.update({"spread": spread, "std": float(np.std(list(present.values()), ddof=1))})
    per_q = [v.best_per_question for v in views if value(v) is not None]
    if any(p is None for p in per_q):
        return {**out, "low": None, "high": None, "ci_method": "none (no per-question scores)"}
    common = sorted(set.intersection(*(set(p) for p in per_q if p is not None)))
    rows = [[(p or {}).get(q) for q in common] for p in per_q]
    matrix = np.asarray([[np.nan if x is None else x for x in r] for r in rows], dtype=np.float64)
    keep = np.isfinite(matrix).all(axis=0)
    matrix = matrix[:, keep]
    if matrix.shape[1] < 2:
        return {
            **out,
            "low": None,
            "high": None,
            "ci_method": "none (fewer than 2 shared questions)",
        }
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, matrix.shape[1], size=(resamples, matrix.shape[1]))
    means = matrix[:, idx].mean(axis=2)  # [variants, B]
    samples = means.max(axis=0) - means.min(axis=0)
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return {
        **out,
        "low": float(lo),
        "high": float(hi),
        "ci_method": "percentile-bootstrap over shared questions (best settings held fixed)",
        "n_questions": int(matrix.shape[1]),
    }


def steering_comparison(run: RunArtefacts) -> dict[str, Any]:
    """``steering_comparison.json``: best score, delta, degradation vs the reference, shifts."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, _content_seed(run)
    groups: dict[tuple[str, str, str, str, str], list[SteerView]] = defaultdict(list)
    for v in run.steer:
        groups[_steer_group_key(v)].append(v)
    entries: list[dict[str, Any]] = []
    spreads: list[dict[str, Any]] = []
    for key in sorted(groups):
        model, trait, method, mode, direction = key
        views = groups[key]
        ref_id = run.reference_of(model)
        ref = next((v for v in views if v.target == ref_id and v.source == ref_id), None)
        n_layers_ref = _num_layers(run, ref_id, trait)
        for v in sorted(views, key=lambda x: (x.target, x.source)):
            steering = "self" if v.self_steered else "reference_vectors"
            n_layers = _num_layers(run, v.target, trait)
            entry: dict[str, Any] = {
                "model": model,
                "trait": trait,
                "method": method,
                "vector_mode": v.vector_mode,
                "mode": mode,
                "direction": direction,
                "target": v.target,
                "precision": _precision_of(v.target),
                "source": v.source,
                "steering": steering,
                "is_reference": v.target == ref_id and v.source == ref_id,
                "objective": v.objective,
                "status": v.status,
                "question_set": v.question_set,
                "best": {
                    "score": v.best_score,
                    "low": v.best_low,
                    "high": v.best_high,
                    "layer": v.effective_layer,
                    "depth": _depth(v.effective_layer, n_layers),
                    "coefficient": v.best_coefficient,
                    "added_norm": v.best_added_norm,
                    "coherence": v.best_coherence,
                },
                "baseline": {
                    "score": v.baseline_score,
                    "low": v.baseline_low,
                    "high": v.baseline_high,
                },
                "delta": {"value": v.delta, "low": v.delta_low, "high": v.delta_high},
                "effect": None if v.delta is None else _effect_sign(v) * v.delta,
                "budget": v.budget,
                "runs": len(v.runs),
                "n_questions": v.n_questions,
                "judge": v.judge,
                "bootstrap": v.bootstrap,
                "sources": {
                    "result": v.key,
                    "reference": ref.key if ref else None,
                    "per_question": v.per_question_keys,
                },
            }
            if ref is None:
                entry["classification"] = classify_steering_degradation(
                    None, reason="no reference steering result"
                ).to_json()
            elif entry["is_reference"]:
                entry["classification"] = None
            else:
                deg = _degradation(ref, v, resamples, _seed(base_seed, _cell(run, v.key)))
                entry["degradation_pct"] = deg
                entry["classification"] = classify_steering_degradation(
                    deg["value"], deg["low"], deg["high"], deg.get("reason")
                ).to_json()
                shift: dict[str, Any] = {}
                lv, lr = v.effective_layer, ref.effective_layer
                if lv is not None and lr is not None:
                    shift["layer"] = lv - lr
                    d_v, d_r = _depth(lv, n_layers), _depth(lr, n_layers_ref)
                    shift["depth"] = None if d_v is None or d_r is None else d_v - d_r
                if v.best_coefficient and ref.best_coefficient:
                    shift["coefficient_ratio"] = v.best_coefficient / ref.best_coefficient
                entry["shift"] = shift
                entry["coherence_at_matched_coefficient"] = _matched_coherence(ref, v)
            entries.append(entry)
        for steering in ("self", "reference_vectors"):
            chosen = [
                v
                for v in views
                if (v.self_steered if steering == "self" else not v.self_steered)
                or (steering == "reference_vectors" and v.target == ref_id)
            ]
            if len(chosen) < 2:
                continue
            spreads.append(
                {
                    "model": model,
                    "trait": trait,
                    "method": method,
                    "mode": mode,
                    "direction": direction,
                    "steering": steering,
                    "best_score": _spread(
                        chosen, lambda x: x.best_score, resamples, _seed(base_seed, key, steering)
                    ),
                    "delta_values": {_precision_of(x.target): x.delta for x in chosen},
                    "sources": sorted(x.key for x in chosen),
                }
            )
    return {
        "schema": SCHEMA,
        "kind": "steering_comparison",
        "run_id": run.run_id,
        "reference_precision": run.reference,
        "threshold": THRESHOLDS["steering_degradation_pct"].to_json(),
        "coherence_threshold": spec.judge.coherence_threshold,
        "judge": {"backend": spec.judge.backend, "model": spec.judge.model},
        "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
        "entries": entries,
        "spread": spreads,
    }


# ---------------------------------------------------------------------------------------------
# Logit difference.


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
            b[:, k], a[:, k], paired=True, resamples=resamples, seed=_seed(seed, "shift", c)
        )
        per_coef.append(
            {
                "multiple": c,
                "pearson": stats.pearson(a[:, k], b[:, k]).to_json(),
                "spearman": stats.spearman(a[:, k], b[:, k]).to_json(),
                "reference_mean": _f(a[:, k].mean()) if a.shape[0] else None,
                "variant_mean": _f(b[:, k].mean()) if b.shape[0] else None,
                "mean_shift": shift.to_json(),
            }
        )
    n = int(a.shape[0])
    summary: dict[str, Any] = {"value": None, "low": None, "high": None, "n": n}
    if n >= 3 and coefs:
        point = _zmean(_pearson_rows(a.T, b.T), axis=0)
        summary["value"] = _f(point)
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


def logit_diff_comparison(run: RunArtefacts) -> dict[str, Any]:
    """``logit_diff_comparison.json``: per-question logit differences vs the reference."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, _content_seed(run)
    entries: list[dict[str, Any]] = []
    cells = _against_reference(run, run.logit_diff, lambda v: (v.trait, v.method))
    for (model, trait, method), ref_id, ref, v in cells:
        entry: dict[str, Any] = {
            "model": model,
            "trait": trait,
            "method": method,
            "variant": v.variant,
            "precision": _precision_of(v.variant),
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
            cmp = _compare_logit_diff(ref, v, resamples, _seed(base_seed, _cell(run, v.key)))
            entry["comparison"] = cmp
            c = cmp["correlation"]
            entry["classification"] = classify_logit_correlation(
                c["value"], c["low"], c["high"]
            ).to_json()
        entries.append(entry)
    return {
        "schema": SCHEMA,
        "kind": "logit_diff_comparison",
        "run_id": run.run_id,
        "reference_precision": run.reference,
        "threshold": THRESHOLDS["logit_diff_correlation"].to_json(),
        "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
        "entries": entries,
    }


# ---------------------------------------------------------------------------------------------
# Benchmarks.


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


def benchmark_comparison(run: RunArtefacts) -> dict[str, Any]:
    """``benchmark_comparison.json``: accuracy and Δpp vs the reference, with intervals."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, _content_seed(run)
    entries: list[dict[str, Any]] = []
    for (model, name), ref_id, ref, v in _against_reference(
        run, run.benchmarks, lambda v: (v.name,)
    ):
        entry: dict[str, Any] = {
            "model": model,
            "benchmark": name,
            "variant": v.variant,
            "precision": _precision_of(v.variant),
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
                a, b, paired=True, resamples=resamples, seed=_seed(base_seed, _cell(run, v.key))
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
    return {
        "schema": SCHEMA,
        "kind": "benchmark_comparison",
        "run_id": run.run_id,
        "reference_precision": run.reference,
        "threshold": THRESHOLDS["benchmark_drop_pp"].to_json(),
        "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
        "entries": entries,
    }


# ---------------------------------------------------------------------------------------------
# Safety: refusal direction, safety neurons, probe statistics.


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


def _aligned_rows(
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
    sub_ref = _subset(reference, keep)
    sub_var = _subset(variant, keep)
    out: dict[str, Any] = {"layers": keep, "top_fraction": top_fraction}
    if not {"train_pos", "train_neg"} <= set(sub_ref.groups) or not keep:
        return {**out, "n": 0, "reason": "no reference training activations at these layers"}
    a_ref, a_var, align = _aligned_rows(sub_ref, sub_var)
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
                "mean_ratio": _f(np.nanmean(r)) if np.isfinite(r).any() else None,
                "mean_error_safety": _f(s.mean()),
                "mean_error_other": _f(o.mean()),
            }
        )
    return {
        **out,
        "n": int(a_ref.shape[0]),
        "neurons_per_layer": k,
        "hidden_size": hidden,
        "mean_error_safety": _f(safety_err.mean()),
        "mean_error_other": _f(other_err.mean()),
        "ratio": stats.bootstrap(ratio, resamples=resamples, seed=seed).to_json(),
        "relative_ratio": stats.bootstrap(rel_ratio, resamples=resamples, seed=seed + 1).to_json(),
        "t_test": stats.one_sample_t(ratio, 1.0, alternative="greater").to_json(),
        "relative_t_test": stats.one_sample_t(rel_ratio, 1.0, alternative="greater").to_json(),
        "mann_whitney": stats.mann_whitney(safety_err, other_err, alternative="greater").to_json(),
        "per_layer": per_layer,
    }


def _subset(acts: Activations, layers: Sequence[int]) -> Activations:
    idx = [acts.layers.index(layer) for layer in layers if layer in acts.layers]
    return Activations(
        key=acts.key,
        layers=tuple(acts.layers[i] for i in idx),
        groups={k: v[:, idx] for k, v in acts.groups.items()},
        pair_ids=acts.pair_ids,
    )


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
                b, a, paired=True, resamples=resamples, seed=_seed(seed, m)
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
            seed=_seed(seed, "refusal"),
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


def probe_statistics(run: RunArtefacts) -> dict[str, Any]:
    """``probe_statistics.json``: probe shifts, refusal direction, safety neurons, correlations."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, _content_seed(run)
    # -- safety probes ---------------------------------------------------------------------
    probes: list[dict[str, Any]] = []
    for (model, name), ref_id, ref, v in _against_reference(run, run.probes, lambda v: (v.name,)):
        entry: dict[str, Any] = {
            "model": model,
            "probe": name,
            "variant": v.variant,
            "precision": _precision_of(v.variant),
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
                ref, v, resamples, _seed(base_seed, _cell(run, v.key))
            )
        probes.append(entry)
    # -- refusal direction and safety neurons --------------------------------------------------
    refusal: list[dict[str, Any]] = []
    neurons: list[dict[str, Any]] = []
    arditi = [t for t, methodology, _ in _trait_names(run) if methodology == "arditi"]
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
                        seed=_seed(base_seed, "neurons", pv.id, trait),
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
    # -- across variants: do geometry and behaviour move together? ------------------------------
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
        four = [x for v, x in values.items() if PRECISION_BITS.get(_precision_of(v), 16) <= 4]
        wide = [x for v, x in values.items() if PRECISION_BITS.get(_precision_of(v), 16) > 4]
        groups.append(
            {
                "metric": name,
                "groups": {"4-bit": len(four), "8-bit and wider": len(wide)},
                "mann_whitney": stats.mann_whitney(four, wide).to_json(),
            }
        )
    return {
        "schema": SCHEMA,
        "kind": "probe_statistics",
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


# ---------------------------------------------------------------------------------------------
# Robustness ranking.


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
                        xa, xb, paired=True, resamples=resamples, seed=_seed(seed, a, b)
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


def robustness_ranking(
    run: RunArtefacts,
    vectors: Mapping[str, Any],
    steering: Mapping[str, Any],
    benchmarks: Mapping[str, Any],
) -> dict[str, Any]:
    """``robustness_ranking.json``: probe vs mean_diff (and pca), precisions, models, families."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, _content_seed(run)
    methods = list(spec.methods)
    # Vector cosine per condition (model, trait, variant) and method, primary mode only.
    cos_cond: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for e in vectors["entries"]:
        mc = e["window"]["mean_cosine"]
        if e["primary"] and mc is not None:
            cos_cond[(e["model"], e["trait"], e["variant"])][e["method"]] = mc
    deg_cond: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for e in steering["entries"]:
        d = (e.get("degradation_pct") or {}).get("value")
        if d is not None:
            cond = (e["model"], e["trait"], e["target"], e["steering"], e["mode"], e["direction"])
            deg_cond[cond][e["method"]] = d

    def compare(
        conditions: Mapping[tuple[Any, ...], Mapping[str, float]], tag: str, higher: bool
    ) -> dict[str, Any]:
        return {
            "higher_is_better": higher,
            "by_method": {
                m: stats.bootstrap(
                    [v[m] for v in conditions.values() if m in v],
                    resamples=resamples,
                    seed=_seed(base_seed, tag, m),
                ).to_json()
                for m in methods
            },
            "pairs": _method_pairs(conditions, methods, resamples, base_seed, higher),
        }

    method_comparison = {
        "vector_cosine": compare(cos_cond, "cos", True),
        "steering_degradation_pct": compare(deg_cond, "deg", False),
    }

    def collect(
        group_of: Callable[[str], str | None],
    ) -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for e in vectors["entries"]:
            g = group_of(e["variant"])
            if g is not None and e["primary"] and e["window"]["mean_cosine"] is not None:
                out[g]["cosine"].append(e["window"]["mean_cosine"])
        for e in steering["entries"]:
            g = group_of(e["target"])
            d = (e.get("degradation_pct") or {}).get("value")
            if g is not None and d is not None:
                out[g]["degradation"].append(d)
        for e in benchmarks["entries"]:
            g = group_of(e["variant"])
            if g is not None and e.get("drop_pp") is not None:
                out[g]["drop"].append(e["drop_pp"])
        return out

    def summarise(values: Mapping[str, list[float]], tag: str) -> dict[str, Any]:
        return {
            "mean_cosine": stats.bootstrap(
                values.get("cosine", []), resamples=resamples, seed=_seed(base_seed, tag, "c")
            ).to_json(),
            "mean_degradation_pct": stats.bootstrap(
                values.get("degradation", []), resamples=resamples, seed=_seed(base_seed, tag, "d")
            ).to_json(),
            "mean_drop_pp": stats.bootstrap(
                values.get("drop", []), resamples=resamples, seed=_seed(base_seed, tag, "b")
            ).to_json(),
        }

    by_precision = collect(
        lambda v: _precision_of(v) if _precision_of(v) != run.reference else None
    )
    precisions = _rank(
        [
            {"precision": p, "bits": PRECISION_BITS.get(p), **summarise(vals, f"p:{p}")}
            for p, vals in sorted(by_precision.items())
        ],
        "mean_cosine",
        True,
    )
    models_meta = {v.model.name: v.model for v in run.variants}
    by_model = collect(lambda v: _model_of(v) if _precision_of(v) != run.reference else None)
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
    by_family = collect(
        lambda v: fam_of.get(_model_of(v)) if _precision_of(v) != run.reference else None
    )
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
    return {
        "schema": SCHEMA,
        "kind": "robustness_ranking",
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


def build_all(run: RunArtefacts) -> dict[str, dict[str, Any]]:
    """Every analysis document, keyed by file name."""
    vectors = vector_comparison(run)
    steering = steering_comparison(run)
    logit = logit_diff_comparison(run)
    bench = benchmark_comparison(run)
    probes = probe_statistics(run)
    ranking = robustness_ranking(run, vectors, steering, bench)
    return {
        "vector_comparison.json": vectors,
        "steering_comparison.json": steering,
        "logit_diff_comparison.json": logit,
        "benchmark_comparison.json": bench,
        "robustness_ranking.json": ranking,
        "probe_statistics.json": probes,
    }
