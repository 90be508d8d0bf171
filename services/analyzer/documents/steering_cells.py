"""Per-cell steering math: the effect of a steer result, its degradation against the reference
with a paired question bootstrap, and coherence at a matched coefficient."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from services.analyzer import stats
from services.analyzer.views import SteerRun, SteerView

__all__ = [
    "MATCH_TOLERANCE",
    "degradation",
    "effect_sign",
    "matched_coherence",
    "per_question_effect",
    "run_layer",
]


MATCH_TOLERANCE = 0.15  # relative coefficient gap accepted as "the same coefficient"


def effect_sign(view: SteerView) -> float:
    """+1 when the job maximised the trait score, -1 when it minimised it (away, ablation)."""
    return -1.0 if view.objective == "min" else 1.0


def per_question_effect(view: SteerView) -> dict[str, float] | None:
    """Per question: signed (best - baseline); None without per-question scores."""
    if not view.best_per_question or not view.baseline_per_question:
        return None
    sign = effect_sign(view)
    out: dict[str, float] = {}
    for q, best in view.best_per_question.items():
        base = view.baseline_per_question.get(q)
        if best is not None and base is not None:
            out[q] = sign * (best - base)
    return out or None


def degradation(
    ref: SteerView, var: SteerView, resamples: int, seed: int, level: float = stats.DEFAULT_LEVEL
) -> dict[str, Any]:
    """Degradation of the steering effect in %, with a question-bootstrap interval."""
    if ref.delta is None or var.delta is None:
        return {"value": None, "low": None, "high": None, "reason": "no delta"}
    e_ref = effect_sign(ref) * ref.delta
    e_var = effect_sign(var) * var.delta
    if e_ref <= 0:
        return {
            "value": None,
            "low": None,
            "high": None,
            "reason": f"the reference's steering effect is {e_ref:.3g} (not positive)",
        }
    if ref.delta_low is not None and ref.delta_high is not None:
        lo, hi = sorted((effect_sign(ref) * ref.delta_low, effect_sign(ref) * ref.delta_high))
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
    qa, qb = per_question_effect(ref), per_question_effect(var)
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


def run_layer(run: SteerRun) -> int | None:
    return run.layer if run.layer is not None else run.vector_layer


def matched_coherence(ref: SteerView, var: SteerView) -> dict[str, Any]:
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
        same = [r for r in var.runs if run_layer(r) == layer]
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
