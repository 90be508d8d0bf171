"""``steering_comparison.json``: best score, delta and degradation vs the reference, and its report section."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
)
from services.analyzer.classify import (
    THRESHOLDS,
    classify_steering_degradation,
)
from services.analyzer.documents.both_directions import reverse_source
from services.analyzer.documents.common import (
    cell_id,
    content_seed,
    model_of,
    precision_of,
    seed_of,
)
from services.analyzer.documents.models import SteeringComparison, SteeringEntry
from services.analyzer.documents.steering_cells import (
    effect_sign,
    matched_coherence,
)
from services.analyzer.documents.trust import (
    held_out_cell,
    held_out_view,
    noise_cell,
    noise_classified,
    trust_blocks,
    trusted_degradation,
)
from services.analyzer.figures import FigureImage
from services.analyzer.loading import RunArtefacts
from services.analyzer.views import SteerView

__all__ = ["steering_comparison", "steering_section"]


def _steer_group_key(v: SteerView) -> tuple[str, str, str, str, str]:
    return (model_of(v.target), v.trait, v.method, v.mode, v.direction)


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
        "values": {precision_of(k): x for k, x in vals.items()},
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


def _entry(
    run: RunArtefacts, key: tuple[str, ...], v: SteerView, ref: SteerView | None
) -> dict[str, Any]:
    """One steer result's row: best, baseline, delta and effect (before the comparison)."""
    model, trait, method, mode, direction = key
    ref_id = run.reference_of(model)
    steering = "self" if v.self_steered else "reference_vectors"
    n_layers = _num_layers(run, v.target, trait)
    return {
        "model": model,
        "trait": trait,
        "method": method,
        "vector_mode": v.vector_mode,
        "mode": mode,
        "direction": direction,
        "target": v.target,
        "precision": precision_of(v.target),
        "source": v.source,
        "steering": steering,
        "is_reference": v is ref or (v.target == ref_id and v.source == ref_id),
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
        "effect": None if v.delta is None else effect_sign(v) * v.delta,
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
        **held_out_cell(v),
        **noise_cell(v),
    }


def _compare_entry(
    run: RunArtefacts, entry: dict[str, Any], v: SteerView, ref: SteerView | None, base_seed: int
) -> None:
    """Degradation vs the reference, its class, and the best-layer / coefficient shifts."""
    resamples = run.spec.steering.bootstrap
    n_layers = _num_layers(run, v.target, entry["trait"])
    n_layers_ref = _num_layers(run, run.reference_of(entry["model"]), entry["trait"])
    if ref is None:
        entry["classification"] = classify_steering_degradation(
            None, reason="no reference steering result"
        ).to_json()
    elif entry["is_reference"]:
        entry["classification"] = None
    else:
        seed = seed_of(base_seed, cell_id(run, v.key))
        deg, difference = trusted_degradation(ref, v, resamples, seed)
        entry["degradation_pct"] = deg
        entry["classification"] = noise_classified(
            classify_steering_degradation(deg["value"], deg["low"], deg["high"], deg.get("reason")),
            ref,
            difference,
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
        entry["coherence_at_matched_coefficient"] = matched_coherence(ref, v)


def _reference_view(views: Sequence[SteerView], ref_id: str) -> SteerView | None:
    """What a group's variants are compared with: the reference's own steering, or for an
    imported vector set the reference model steered with that same set."""
    own = next((v for v in views if v.target == ref_id and v.source == ref_id), None)
    if own is not None:
        return own
    return next(
        (v for v in views if v.target == ref_id and v.source.startswith(IMPORTED_PREFIX)), None
    )


def _by_vector_set(views: Sequence[SteerView]) -> list[list[SteerView]]:
    """A group's views, each imported vector set apart (all share the method ``imported``;
    a set is compared only with the reference steered by the same set), extracted ones
    together."""
    sets: dict[str, list[SteerView]] = defaultdict(list)
    for v in views:
        sets[v.source if v.source.startswith(IMPORTED_PREFIX) else ""].append(v)
    return [sets[name] for name in sorted(sets)]


def _spreads(
    run: RunArtefacts, key: tuple[str, str, str, str, str], views: list[SteerView], base_seed: int
) -> list[dict[str, Any]]:
    """Across-precision spread of the best score, for self- and reference-vector steering."""
    model, trait, method, mode, direction = key
    ref_id = run.reference_of(model)
    resamples = run.spec.steering.bootstrap
    spreads: list[dict[str, Any]] = []
    for steering in ("self", "reference_vectors"):
        chosen = [
            v
            for v in views
            if (v.self_steered if steering == "self" else not v.self_steered)
            or (steering == "reference_vectors" and v.target == ref_id)
        ]
        if len(chosen) < 2:
            continue
        # Across precisions the held-out scores are compared when every variant has one.
        held = [held_out_view(v) for v in chosen]
        basis = {}
        if all(h is not None for h in held):
            chosen, basis = [h for h in held if h is not None], {"score_basis": "held_out"}
        spreads.append(
            {
                "model": model,
                "trait": trait,
                "method": method,
                "mode": mode,
                "direction": direction,
                "steering": steering,
                "best_score": _spread(
                    chosen, lambda x: x.best_score, resamples, seed_of(base_seed, key, steering)
                ),
                "delta_values": {precision_of(x.target): x.delta for x in chosen},
                "sources": sorted(x.key for x in chosen),
                **basis,
            }
        )
    return spreads


def steering_comparison(run: RunArtefacts) -> SteeringComparison:
    """``steering_comparison.json``: best score, delta, degradation vs the reference, shifts."""
    spec = run.spec
    resamples, base_seed = spec.steering.bootstrap, content_seed(run)
    groups: dict[tuple[str, str, str, str, str], list[SteerView]] = defaultdict(list)
    for v in run.steer:
        if not reverse_source(run, v.target, v.source):  # both_directions shows those
            groups[_steer_group_key(v)].append(v)
    entries: list[dict[str, Any]] = []
    spreads: list[dict[str, Any]] = []
    for key in sorted(groups):
        ref_id = run.reference_of(key[0])
        for views in _by_vector_set(groups[key]):
            ref = _reference_view(views, ref_id)
            for v in sorted(views, key=lambda x: (x.target, x.source)):
                entry = _entry(run, key, v, ref)
                _compare_entry(run, entry, v, ref, base_seed)
                entries.append(entry)
            spreads += _spreads(run, key, views, base_seed)
    return SteeringComparison.model_validate(
        {
            "run_id": run.run_id,
            "reference_precision": run.reference,
            "threshold": THRESHOLDS["steering_degradation_pct"].to_json(),
            "coherence_threshold": spec.judge.coherence_threshold,
            "judge": {"backend": spec.judge.backend, "model": spec.judge.model},
            "bootstrap": {"resamples": resamples, "seed": spec.steering.seed},
            "entries": entries,
            "spread": spreads,
        }
    )


# ---------------------------------------------------------------------------------------------


def _entry_row(e: SteeringEntry) -> tuple[Cell, ...]:
    """One steering table row."""
    best = e.best
    deg = e.degradation_pct or {}
    shift = e.shift or {}
    matched = e.coherence_at_matched_coefficient or {}
    return (
        e.model,
        e.trait,
        e.method,
        f"{e.mode}{e.direction}",
        e.target,
        e.source
        if e.source.startswith(IMPORTED_PREFIX)
        else ("reference" if e.is_reference else e.steering),
        fmt_ci(best.score, best.low, best.high, 1),
        fmt_est(e.delta, 1),
        "—" if e.is_reference else fmt_ci(deg.get("value"), deg.get("low"), deg.get("high"), 1),
        f"{fmt_num(best.layer)} ({'+' if (shift.get('layer') or 0) > 0 else ''}{fmt_num(shift.get('layer'))})"
        if not e.is_reference
        else fmt_num(best.layer),
        fmt_num(shift.get("coefficient_ratio"), 2),
        fmt_num(best.coherence, 1),
        fmt_num(matched.get("coherence"), 1),
        badge(e.classification),
    )


def _spread_blocks(doc: SteeringComparison) -> list[Block]:
    """The across-precision spread table."""
    blocks: list[Block] = []
    spread = doc.spread
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
                            f"{p}: {fmt_num(v, 1)}" for p, v in s["best_score"]["values"].items()
                        ),
                        fmt_ci(
                            s["best_score"]["spread"],
                            s["best_score"]["low"],
                            s["best_score"]["high"],
                            1,
                        ),
                        fmt_num(s["best_score"]["std"], 1),
                    )
                    for s in spread
                ),
                "Spread across precisions: max − min best score; interval from resampling "
                "questions with each variant's best setting held fixed.",
            )
        )
    return blocks


def steering_section(doc: SteeringComparison, figures: Sequence[FigureImage]) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Steering", "steering"),
        Paragraph(
            "Best score: mean trait score (0–100) of the best setting whose mean coherence "
            f"reaches {fmt_num(doc.coherence_threshold, 0)}; delta: paired mean (steered − "
            "unsteered) over questions; degradation: loss of the steering effect relative to "
            "the reference's own steering, in %. 'self': a variant steered with its own "
            "vectors; 'reference_vectors': steered with the reference's vectors "
            "(cross-precision). Coherence at matched: the variant's coherence at the "
            "reference's best layer and intervention size. Source: "
            "analysis/steering_comparison.json."
        ),
    ]
    blocks += figure_blocks(figures, "steering-bars")
    # Vectors imported through the spec's ``vectors:`` section were made elsewhere: shown
    # apart, so a reader never takes them for this run's extractions.
    extracted = [e for e in doc.entries if not e.source.startswith(IMPORTED_PREFIX)]
    imported = [e for e in doc.entries if e.source.startswith(IMPORTED_PREFIX)]
    blocks.append(Table(_COLUMNS, tuple(_entry_row(e) for e in extracted)))
    if imported:
        blocks.append(
            Table(
                _COLUMNS,
                tuple(_entry_row(e) for e in imported),
                "Imported vectors (spec vectors:, made outside this run): each variant steered "
                "with the same imported set; 'vectors' names it.",
            )
        )
    blocks += _spread_blocks(doc)
    blocks += trust_blocks(doc)
    return blocks


IMPORTED_PREFIX = "imported-"

_COLUMNS = (
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
)
