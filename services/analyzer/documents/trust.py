"""Steering numbers a reader can trust: the held-out re-score (winner's curse) and the
reference's noise floor in ``steering_comparison.json``, and their report blocks.

A steer result's best setting is chosen on the questions it is scored on; where both the
reference and the variant re-scored their chosen settings on held-out questions
(``SteerResult.held_out``), degradation compares those held-out effects (``score_basis:
held_out``; the in-sample figure stays beside it). The reference's noise floor
(``SteerResult.noise``) gives the band inside which two effects are not told apart; the
classification uses it (:func:`services.analyzer.classify.with_noise_band`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from services.analyzer.blocks import Block, Paragraph, Table, fmt_ci, fmt_num
from services.analyzer.classify import Classification, with_noise_band
from services.analyzer.documents.models import SteeringComparison
from services.analyzer.documents.steering_cells import degradation, effect_sign
from services.analyzer.views import SteerView

__all__ = [
    "held_out_cell",
    "held_out_view",
    "noise_cell",
    "noise_classified",
    "trust_blocks",
    "trusted_degradation",
]


def held_out_view(v: SteerView) -> SteerView | None:
    """``v`` with its best score, delta and per-question scores taken from the held-out
    re-score; None without one."""
    h = v.held_out
    if h is None or h.delta is None:
        return None
    ci = h.delta_ci
    return replace(
        v,
        best_score=h.mean_trait,
        delta=h.delta,
        delta_low=ci.low if ci else None,
        delta_high=ci.high if ci else None,
        best_per_question={str(i): x for i, x in enumerate(h.trait_values)},
        baseline_per_question={str(i): x for i, x in enumerate(h.baseline_values)},
    )


def held_out_cell(v: SteerView) -> dict[str, Any]:
    """The entry's ``held_out`` cell (empty without a re-score)."""
    h = v.held_out
    if h is None:
        return {}
    ci = h.delta_ci
    gap = None
    if v.best_score is not None and h.mean_trait is not None:
        gap = v.best_score - h.mean_trait
    cell = {
        "n": h.n,
        "score": h.mean_trait,
        "coherence": h.mean_coherence,
        "baseline": h.baseline_trait,
        "delta": {"value": h.delta, "low": ci.low if ci else None, "high": ci.high if ci else None},
        "effect": None if h.delta is None else effect_sign(v) * h.delta,
        "search_minus_held_out": gap,
    }
    return {"held_out": cell}


def noise_cell(v: SteerView) -> dict[str, Any]:
    """The entry's ``noise`` cell (the reference's own steering only)."""
    n = v.noise
    if n is None:
        return {}
    return {
        "noise": {
            "n": n.n,
            "repeats": n.repeats,
            "temperature": n.temperature,
            "sd": n.sd,
            "band": n.band,
            "components": {
                c.source: {"sd": c.sd, "effects": c.effects, "note": c.note} for c in n.components
            },
        }
    }


def trusted_degradation(
    ref: SteerView, var: SteerView, resamples: int, seed: int
) -> tuple[dict[str, Any], float | None]:
    """Degradation on held-out scores when both have them (else in-sample), and the effect
    difference (reference - variant, trait points) it rests on."""
    ho_ref, ho_var = held_out_view(ref), held_out_view(var)
    if ho_ref is not None and ho_var is not None:
        deg = degradation(ho_ref, ho_var, resamples, seed)
        deg["score_basis"] = "held_out"
        deg["in_sample_value"] = degradation(ref, var, resamples, seed)["value"]
        ref, var = ho_ref, ho_var
    else:
        deg = degradation(ref, var, resamples, seed)
        deg["score_basis"] = "search"
    diff = None
    if ref.delta is not None and var.delta is not None:
        diff = effect_sign(ref) * ref.delta - effect_sign(var) * var.delta
    return deg, diff


def noise_classified(c: Classification, ref: SteerView, difference: float | None) -> Classification:
    """``c`` against the reference's noise band (unchanged without a noise floor)."""
    band = ref.noise.band if ref.noise is not None else None
    return with_noise_band(c, difference, band)


def trust_blocks(doc: SteeringComparison) -> list[Block]:
    """The held-out re-score table and the noise-floor table."""
    blocks: list[Block] = []
    held = [e for e in doc.entries if e.held_out]
    if held:
        blocks.append(
            Table(
                (
                    "model",
                    "trait",
                    "method",
                    "mode",
                    "target",
                    "vectors",
                    "n",
                    "search score",
                    "held-out score",
                    "search − held-out",
                    "held-out delta [95% CI]",
                    "basis of the class",
                ),
                tuple(
                    (
                        e.model,
                        e.trait,
                        e.method,
                        f"{e.mode}{e.direction}",
                        e.target,
                        "reference" if e.is_reference else e.steering,
                        fmt_num(h.get("n")),
                        fmt_num(e.best.score, 1),
                        fmt_num(h.get("score"), 1),
                        fmt_num(h.get("search_minus_held_out"), 1),
                        fmt_ci(h["delta"]["value"], h["delta"]["low"], h["delta"]["high"], 1),
                        (e.degradation_pct or {}).get("score_basis", "—"),
                    )
                    for e in held
                    if (h := e.held_out) is not None
                ),
                "Winner's curse: the best setting is chosen on the search's questions; the "
                "held-out score is the same setting on questions the search never saw. "
                "Degradation and class use the held-out effects where the reference and the "
                "variant both have them.",
            )
        )
    noisy = [e for e in doc.entries if e.noise]
    if noisy:
        blocks.append(Paragraph(_NOISE_TEXT))
        blocks.append(
            Table(
                (
                    "model",
                    "trait",
                    "method",
                    "n",
                    "questions SD",
                    "seeds SD",
                    "re-judge SD",
                    "band ±",
                ),
                tuple(_noise_row(e.model, e.trait, e.method, e.noise or {}) for e in noisy),
            )
        )
    return blocks


_NOISE_TEXT = (
    "Noise floor: the reference's chosen setting measured again where only chance changes — "
    "other samples of the steering questions, other sampling seeds, the judge asked again. "
    "Band = 1.96·√2·SD (SDs added in quadrature): a precision whose steering effect is within "
    "the band of the reference's is classed robust (within_noise). The re-judging bypasses "
    "the judge's cache (a deterministic judge measures 0); one the cache answered is shown "
    "but not counted."
)


def _noise_row(model: str, trait: str, method: str, noise: dict[str, Any]) -> tuple[Any, ...]:
    comps = noise.get("components", {})

    def sd(name: str) -> str:
        c = comps.get(name)
        if c is None:
            return "—"
        return "not counted (cached)" if c.get("note") else fmt_num(c.get("sd"), 2)

    return (
        model,
        trait,
        method,
        fmt_num(noise.get("n")),
        sd("questions"),
        sd("seeds"),
        sd("rejudge"),
        fmt_num(noise.get("band"), 2),
    )
