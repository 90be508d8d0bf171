"""Both directions: the 2x2 controlled replay (which of text and model moved a vector) and
cross-precision steering and CAA logit difference run each way, with their report section.

Each is a 2x2 of one number, model (reference / variant) x input (the reference's / the
variant's text or vectors), split additively (:func:`two_by_two`). The lists live in the
documents they extend (``vector_comparison.json`` ``replay_2x2``, ``steering_comparison.json``
and ``logit_diff_comparison.json`` ``both_directions``) and are written only when the run has
such results.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from services.analyzer.blocks import (
    Block,
    Cell,
    Details,
    Heading,
    Paragraph,
    Table,
    fmt_ci,
    fmt_est,
    fmt_num,
)
from services.analyzer.documents.common import (
    cell_id,
    content_seed,
    mean_of,
    model_of,
    precision_of,
    seed_of,
    trait_names,
)
from services.analyzer.documents.logit_diff import _compare_logit_diff
from services.analyzer.documents.models import (
    LogitDiffBothEntry,
    LogitDiffComparison,
    Replay2x2Entry,
    SteeringBothEntry,
    SteeringComparison,
    TwoByTwo,
    VectorComparison,
)
from services.analyzer.documents.steering_cells import degradation, effect_sign
from services.analyzer.documents.vectors import compare_vectors
from services.analyzer.geometry import layer_window
from services.analyzer.loading import Extraction, RunArtefacts
from services.analyzer.views import LogitDiffView, SteerView

__all__ = [
    "both_directions_section",
    "logit_diff_both",
    "replay_2x2",
    "reverse_source",
    "steering_both",
    "two_by_two",
]


def two_by_two(
    ref_ref: float | None, ref_var: float | None, var_ref: float | None, var_var: float | None
) -> TwoByTwo:
    """The cells (model_input) and their split: the input's effect is the mean over models of
    the change from the reference's input to the variant's; the model's likewise."""
    full = None not in (ref_ref, ref_var, var_ref, var_var)
    rr, rv, vr, vv = (x or 0.0 for x in (ref_ref, ref_var, var_ref, var_var))
    return TwoByTwo(
        ref_ref=ref_ref,
        ref_var=ref_var,
        var_ref=var_ref,
        var_var=var_var,
        input_effect=((rv - rr) + (vv - vr)) / 2 if full else None,
        model_effect=((vr - rr) + (vv - rv)) / 2 if full else None,
        interaction=vv - vr - rv + rr if full else None,
    )


# -- the 2x2 controlled replay ----------------------------------------------------------------


def _cosines(ref: Extraction, cell: Extraction, method: str) -> dict[int, float | None]:
    """Per layer: cosine of ``cell``'s vector with the reference's own."""
    cmp = compare_vectors(ref.vectors[method], cell.vectors[method], [])
    return dict(zip(cmp["layers"], cmp["cosine"], strict=True))


def _replay_entry(
    run: RunArtefacts, base: dict[str, Any], cells: dict[str, Extraction], method: str
) -> Replay2x2Entry | None:
    """One variant's 2x2 (cells: ref_ref, ref_var, var_ref, var_var extractions)."""
    if any(method not in ex.vectors for ex in cells.values()):
        return None
    ref = cells["ref_ref"]
    cos = {name: _cosines(ref, ex, method) for name, ex in cells.items()}
    layers = sorted(set.intersection(*(set(c) for c in cos.values())))
    per_layer = [two_by_two(*(cos[n][layer] for n in cos)) for layer in layers]
    window = [
        layer
        for layer in layer_window(ref.summary.layers, ref.num_layers, run.spec.analysis.layer_range)
        if layer in layers
    ]
    at = [layers.index(layer) for layer in window]
    means = [
        mean_of(getattr(per_layer[k], name) for k in at)
        for name in ("ref_ref", "ref_var", "var_ref", "var_var")
    ]
    return Replay2x2Entry.model_validate(
        {
            **base,
            "method": method,
            "layers": layers,
            "per_layer": per_layer,
            "window_layers": window,
            "window": two_by_two(*means),
            "sources": {name: ex.vector_keys[method] for name, ex in cells.items()},
        }
    )


def replay_2x2(run: RunArtefacts) -> list[Replay2x2Entry]:
    """Every variant whose four cells exist: the reference's native extraction, the variant's
    replay and native ones, and the reference on the variant's text (reverse)."""
    out: list[Replay2x2Entry] = []
    for (ref_id, trait, variant), reverse in sorted(run.reverse.items()):
        cells = {
            "ref_ref": run.extractions.get((ref_id, trait, "native")),
            "ref_var": reverse,
            "var_ref": run.extractions.get((variant, trait, "replay")),
            "var_var": run.extractions.get((variant, trait, "native")),
        }
        present = {k: v for k, v in cells.items() if v is not None}
        if len(present) < 4:
            continue
        position = next((p for t, _m, p in trait_names(run) if t == trait), "")
        base = {
            "model": model_of(ref_id),
            "trait": trait,
            "position": position,
            "reference": ref_id,
            "variant": variant,
            "precision": precision_of(variant),
        }
        for method in run.spec.methods:
            entry = _replay_entry(run, base, present, method)
            if entry is not None:
                out.append(entry)
    return out


# -- steering and logit difference both ways ------------------------------------------------


def _crossed(
    run: RunArtefacts, group: Sequence[Any], target: str, source: str, either: bool
) -> tuple[dict[tuple[str, str], Any], str, list[str]]:
    """One model's views by (model, vectors), its reference, and the variants run across
    precisions: the reference with the variant's vectors; with ``either``, also the variant
    with the reference's alone. ``target``/``source`` name the views' attributes."""
    by: dict[tuple[str, str], Any] = {(getattr(v, target), getattr(v, source)): v for v in group}
    ref_id = run.reference_of(model_of(getattr(group[0], target)))
    variants = {v.id for v in run.variants} - {ref_id}  # not imported vector sets
    crossed = [q for q in sorted(variants) if (ref_id, q) in by or (either and (q, ref_id) in by)]
    return by, ref_id, crossed


def reverse_source(run: RunArtefacts, target: str, source: str) -> bool:
    """The reference run with another variant's vectors: shown here, not in the main tables."""
    variants = {v.id for v in run.variants}
    return target == run.reference_of(model_of(target)) and source != target and source in variants


def _effect(view: SteerView | None) -> float | None:
    return None if view is None or view.delta is None else effect_sign(view) * view.delta


def steering_both(run: RunArtefacts) -> list[SteeringBothEntry]:
    """For every variant whose vectors steered the reference (``steering.cross_precision:
    both``): effect and best score as model x vectors, and each cross direction's degradation."""
    resamples, base_seed = run.spec.steering.bootstrap, content_seed(run)
    groups: dict[tuple[str, ...], list[SteerView]] = defaultdict(list)
    for v in run.steer:
        groups[(model_of(v.target), v.trait, v.method, v.mode, v.direction)].append(v)
    out: list[SteeringBothEntry] = []
    for key, group in sorted(groups.items()):
        by, ref_id, crossed = _crossed(run, group, "target", "source", False)
        for variant in crossed:
            rr, rv = by.get((ref_id, ref_id)), by[(ref_id, variant)]
            vr, vv = by.get((variant, ref_id)), by.get((variant, variant))

            def deg(view: SteerView | None, ref: SteerView | None = rr) -> dict[str, Any] | None:
                if view is None or ref is None:
                    return None
                return degradation(ref, view, resamples, seed_of(base_seed, cell_id(run, view.key)))

            model, trait, method, mode, direction = key
            out.append(
                SteeringBothEntry.model_validate(
                    {
                        "model": model,
                        "trait": trait,
                        "method": method,
                        "mode": mode,
                        "direction": direction,
                        "reference": ref_id,
                        "variant": variant,
                        "precision": precision_of(variant),
                        "effect": two_by_two(*(_effect(x) for x in (rr, rv, vr, vv))),
                        "best_score": two_by_two(
                            *(None if x is None else x.best_score for x in (rr, rv, vr, vv))
                        ),
                        "model_changed": deg(vr),
                        "vectors_changed": deg(rv),
                        "sources": _sources(rr, rv, vr, vv),
                    }
                )
            )
    return out


def _sources(*views: SteerView | LogitDiffView | None) -> dict[str, str | None]:
    names = ("ref_ref", "ref_var", "var_ref", "var_var")
    return {n: None if v is None else v.key for n, v in zip(names, views, strict=True)}


def logit_diff_both(run: RunArtefacts) -> list[LogitDiffBothEntry]:
    """For every variant run across precisions (``logit_diff.cross_precision``: true, the
    variant with the reference's vectors; both, also the reference with the variant's): slope
    as model x vectors, and each cross direction's per-question correlation with the
    reference's own values."""
    resamples, base_seed = run.spec.steering.bootstrap, content_seed(run)
    groups: dict[tuple[str, ...], list[LogitDiffView]] = defaultdict(list)
    for v in run.logit_diff:
        groups[(model_of(v.variant), v.trait, v.method)].append(v)
    out: list[LogitDiffBothEntry] = []
    for (model, trait, method), group in sorted(groups.items()):
        by, ref_id, crossed = _crossed(run, group, "variant", "source", True)
        for variant in crossed:
            rr, rv = by.get((ref_id, ref_id)), by.get((ref_id, variant))
            vr, vv = by.get((variant, ref_id)), by.get((variant, variant))

            def corr(view: LogitDiffView | None, ref: LogitDiffView | None = rr) -> Any:
                if view is None or ref is None:
                    return None
                seed = seed_of(base_seed, cell_id(run, view.key))
                return _compare_logit_diff(ref, view, resamples, seed)["correlation"]

            out.append(
                LogitDiffBothEntry.model_validate(
                    {
                        "model": model,
                        "trait": trait,
                        "method": method,
                        "reference": ref_id,
                        "variant": variant,
                        "precision": precision_of(variant),
                        "slope": two_by_two(
                            *(None if x is None else x.slope for x in (rr, rv, vr, vv))
                        ),
                        "model_changed": corr(vr),
                        "vectors_changed": corr(rv),
                        "sources": _sources(rr, rv, vr, vv),
                    }
                )
            )
    return out


# -- the report section -----------------------------------------------------------------------


def _split_cells(t: TwoByTwo, nd: int) -> tuple[Cell, ...]:
    cells = (t.ref_ref, t.ref_var, t.var_ref, t.var_var, t.input_effect, t.model_effect)
    return tuple(fmt_num(x, nd) for x in (*cells, t.interaction))


def _replay_blocks(entries: Sequence[Replay2x2Entry]) -> list[Block]:
    head = ("ref model · ref text", "ref model · variant text", "variant model · ref text")
    cols = (*head, "variant model · variant text", "text effect", "model effect", "interaction")
    blocks: list[Block] = [
        Heading(3, "Text or model: the controlled replay as a 2×2", "replay-2x2"),
        Paragraph(
            "Cosine with the reference's own vector (reference model on its own text) of the "
            "vector extracted by each model (reference / variant) on each text (the reference's "
            "responses / the variant's own). Text effect: mean over the two models of the "
            "cosine change when the text becomes the variant's; model effect: likewise when the "
            "model becomes the variant; they add up to the native cosine's change. Window: "
            "mean over the analysis layer range. Source: analysis/vector_comparison.json "
            "(`replay_2x2`)."
        ),
        Table(
            ("model", "trait", "method", "variant", *cols),
            tuple(
                (e.model, e.trait, e.method, e.variant, *_split_cells(e.window, 3)) for e in entries
            ),
            "Window means; per-layer tables below.",
        ),
    ]
    for e in entries:
        rows = tuple(
            (str(layer), *_split_cells(t, 3))
            for layer, t in zip(e.layers, e.per_layer, strict=True)
        )
        blocks.append(
            Details(
                f"Per layer: {e.trait} · {e.method} · {e.variant}",
                [Table(("layer", *cols), rows)],
            )
        )
    return blocks


def _steering_blocks(entries: Sequence[SteeringBothEntry]) -> list[Block]:
    def deg(d: dict[str, Any] | None) -> str:
        d = d or {}
        return fmt_ci(d.get("value"), d.get("low"), d.get("high"), 1)

    return [
        Heading(3, "Steering both ways", "steering-both"),
        Paragraph(
            "Steering effect (signed delta in the steered direction) of each model (reference / "
            "variant) with each variant's vectors. Model changed: degradation % of the variant "
            "steered with the reference's vectors; vectors changed: of the reference steered "
            "with the variant's vectors; both against the reference's own steering. Vectors "
            "effect and model effect split the change as in the replay 2×2. Source: "
            "analysis/steering_comparison.json (`both_directions`)."
        ),
        Table(
            (
                "model",
                "trait",
                "method",
                "mode",
                "variant",
                "ref · ref vec",
                "ref · variant vec",
                "variant · ref vec",
                "variant · variant vec",
                "vectors effect",
                "model effect",
                "model changed: degr. % [95% CI]",
                "vectors changed: degr. % [95% CI]",
            ),
            tuple(
                (
                    e.model,
                    e.trait,
                    e.method,
                    f"{e.mode}{e.direction}",
                    e.variant,
                    *_split_cells(e.effect, 1)[:6],
                    deg(e.model_changed),
                    deg(e.vectors_changed),
                )
                for e in entries
            ),
        ),
    ]


def _logit_blocks(entries: Sequence[LogitDiffBothEntry]) -> list[Block]:
    return [
        Heading(3, "CAA logit difference both ways", "logit-diff-both"),
        Paragraph(
            "Slope of the logit difference over the coefficient multiple, for each model with "
            "each variant's vectors. Model changed: r of the variant with the reference's "
            "vectors against the reference's own per-question values; vectors changed: of the "
            "reference with the variant's vectors. Source: analysis/logit_diff_comparison.json "
            "(`both_directions`)."
        ),
        Table(
            (
                "model",
                "trait",
                "method",
                "variant",
                "ref · ref vec",
                "ref · variant vec",
                "variant · ref vec",
                "variant · variant vec",
                "vectors effect",
                "model effect",
                "model changed: r [95% CI]",
                "vectors changed: r [95% CI]",
            ),
            tuple(
                (
                    e.model,
                    e.trait,
                    e.method,
                    e.variant,
                    *_split_cells(e.slope, 3)[:6],
                    fmt_est(e.model_changed),
                    fmt_est(e.vectors_changed),
                )
                for e in entries
            ),
        ),
    ]


def both_directions_section(
    vectors: VectorComparison, steering: SteeringComparison, logit_diff: LogitDiffComparison
) -> list[Block]:
    """Nothing unless the run has a 2x2 replay or cross-precision results both ways."""
    blocks: list[Block] = []
    if vectors.replay_2x2:
        blocks += _replay_blocks(vectors.replay_2x2)
    if steering.both_directions:
        blocks += _steering_blocks(steering.both_directions)
    if logit_diff.both_directions:
        blocks += _logit_blocks(logit_diff.both_directions)
    if not blocks:
        return []
    intro = Paragraph(
        "What moved when a precision changed: the text a vector was read on, or the model "
        "reading it; and whether each variant's vectors steer the reference as the reference's "
        "steer the variant."
    )
    return [Heading(2, "Both directions", "both-directions"), intro, *blocks]
