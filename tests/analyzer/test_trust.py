"""Steering numbers a reader can trust (issue 17): degradation on held-out scores, classes that
respect the reference's noise band, and imported vectors shown apart in the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.analyzer.blocks import Bullets, Paragraph, Table
from services.analyzer.classify import classify_steering_degradation, with_noise_band
from services.analyzer.documents import build_all
from services.analyzer.documents.models import SteeringComparison
from services.analyzer.documents.steering import steering_comparison, steering_section
from services.analyzer.documents.trust import (
    held_out_cell,
    noise_classified,
    trust_blocks,
    trusted_degradation,
)
from services.analyzer.loading import RunArtefacts
from services.analyzer.report_methods import methods_section
from services.analyzer.views import SteerView
from services.common.contracts.common import Interval
from services.common.contracts.steer_results import HeldOutScore, NoiseComponent, NoiseFloor
from services.common.planner import variants_of
from services.common.spec import spec_from_bytes

GOLDEN = Path(__file__).with_name("golden") / "documents.json"


def _view(target: str, per_q: list[float], base: list[float], **extra: Any) -> SteerView:
    """A steer view whose in-sample best and baseline are ``per_q`` and ``base`` per question."""
    delta = sum(per_q) / len(per_q) - sum(base) / len(base)
    fields: dict[str, Any] = {
        "key": f"runs/r/{target}/steer/result.json",
        "target": target,
        "source": target,
        "trait": "pv/evil",
        "method": "mean_diff",
        "vector_mode": "native",
        "mode": "add",
        "direction": "+",
        "objective": "max",
        "status": "ok",
        "best_run_index": 0,
        "best_layer": 2,
        "best_vector_layer": 2,
        "best_coefficient": 1.0,
        "best_added_norm": 1.0,
        "best_score": sum(per_q) / len(per_q),
        "best_low": None,
        "best_high": None,
        "best_coherence": 80.0,
        "baseline_score": sum(base) / len(base),
        "baseline_low": None,
        "baseline_high": None,
        "baseline_key": None,
        "delta": delta,
        "delta_low": delta - 5,
        "delta_high": delta + 5,
        "runs": [],
        "budget": {},
        "coherence_threshold": 70.0,
        "judge": {},
        "n_questions": len(per_q),
        "question_set": "eval",
        "bootstrap": {},
        "best_per_question": {str(i): x for i, x in enumerate(per_q)},
        "baseline_per_question": {str(i): x for i, x in enumerate(base)},
    }
    return SteerView(**{**fields, **extra})


def _held(values: list[float], base: list[float]) -> HeldOutScore:
    delta = sum(values) / len(values) - sum(base) / len(base)
    return HeldOutScore(
        questions=[f"q{i}" for i in range(len(values))],
        n=len(values),
        mean_trait=sum(values) / len(values),
        mean_coherence=80.0,
        baseline_trait=sum(base) / len(base),
        delta=delta,
        delta_ci=Interval(value=delta, low=delta - 4, high=delta + 4, n=len(values), method="x"),
        trait_values=values,
        baseline_values=base,
    )


def _noise(band_sd: float) -> NoiseFloor:
    comp = NoiseComponent(source="seeds", description="", effects=[1.0, 2.0], sd=band_sd)
    return NoiseFloor(
        n=4, repeats=2, temperature=0.7, components=[comp], sd=band_sd, band=2.77 * band_sd
    )


BASE = [10.0, 10.0, 10.0, 10.0]


def test_degradation_uses_held_out_scores_when_both_have_them() -> None:
    # In sample the reference looks twice as strong (50 vs 25 points: 50% degraded); on
    # held-out questions both effects are 30 and 24 points: 20% degraded.
    ref = _view("m@bf16", [60, 60, 60, 60], BASE, held_out=_held([40, 40, 40, 40], BASE))
    var = _view("m@nf4", [35, 35, 35, 35], BASE, held_out=_held([34, 34, 34, 34], BASE))
    deg, diff = trusted_degradation(ref, var, 200, 0)
    assert deg["score_basis"] == "held_out"
    assert deg["value"] == pytest.approx(20.0) and deg["in_sample_value"] == pytest.approx(50.0)
    assert diff == pytest.approx(6.0)
    # Without the variant's re-score the in-sample numbers are all there is.
    alone = _view("m@nf4", [35, 35, 35, 35], BASE)
    deg, diff = trusted_degradation(ref, alone, 200, 0)
    assert deg["score_basis"] == "search" and deg["value"] == pytest.approx(50.0)
    assert diff == pytest.approx(25.0)
    cell = held_out_cell(ref)["held_out"]
    assert cell["search_minus_held_out"] == pytest.approx(20.0) and cell["effect"] == 30.0


def test_a_difference_inside_the_noise_band_is_robust() -> None:
    ref = _view("m@bf16", [40, 40, 40, 40], BASE, noise=_noise(3.0))  # band 8.31
    degraded = classify_steering_degradation(20.0, 12.0, 28.0)
    assert degraded.label == "degraded"
    inside = noise_classified(degraded, ref, 6.0).to_json()
    assert inside["class"] == "robust" and inside["within_noise"] is True
    assert inside["noise_band"] == pytest.approx(8.31) and "noise band" in inside["reason"]
    outside = noise_classified(degraded, ref, -9.0).to_json()
    assert outside["class"] == "degraded" and outside["within_noise"] is False
    # No noise floor, or no difference: the class stands as the threshold says.
    plain = _view("m@bf16", [40, 40, 40, 40], BASE)
    assert noise_classified(degraded, plain, 6.0) == degraded
    assert with_noise_band(degraded, None, 8.0) == degraded
    # A robust class stays robust; the band is recorded either way.
    robust = with_noise_band(classify_steering_degradation(5.0), 20.0, 8.0)
    assert robust.label == "robust" and robust.within_noise is False


def _golden_steering() -> dict[str, Any]:
    return dict(json.loads(GOLDEN.read_text())["steering_comparison.json"])


def test_imported_vectors_and_trust_tables_render_apart() -> None:
    doc = _golden_steering()
    entry = next(e for e in doc["entries"] if e["mode"] == "add" and not e["is_reference"])
    imported = {**entry, "source": "imported-repeng", "method": "imported", "steering": "self"}
    original = next(e for e in doc["entries"] if e["mode"] == "add" and e["is_reference"])
    ref = {
        **original,
        "held_out": {
            "n": 4,
            "score": 50.0,
            "baseline": 10.0,
            "delta": {"value": 40.0, "low": 35.0, "high": 45.0},
            "search_minus_held_out": 3.5,
        },
        "noise": {
            "n": 4,
            "band": 7.5,
            "components": {
                "questions": {"sd": 1.5, "note": None},
                "rejudge": {"sd": None, "note": "cached"},
            },
        },
    }
    others = [e for e in doc["entries"] if e is not original]
    comparison = SteeringComparison.model_validate(
        {**doc, "entries": [ref, *others, imported], "spread": []}
    )
    tables = [b for b in steering_section(comparison, []) if isinstance(b, Table)]
    main, apart = tables[0], tables[1]
    assert all("imported-repeng" not in row for row in main.rows)
    assert [row[5] for row in apart.rows] == ["imported-repeng"] and "Imported" in apart.caption
    held, noise = trust_blocks(comparison)[0], trust_blocks(comparison)[-1]
    assert isinstance(held, Table) and isinstance(noise, Table)
    assert held.rows[0][8] == "50.0" and held.rows[0][9] == "3.5"
    assert noise.rows[0][4] == "1.50" and noise.rows[0][6] == "not counted (cached)"
    assert noise.rows[0][7] == "7.50"


SPEC = b"""
name: trust
models: [{name: m, source: "tiny:llama", device: cpu}]
precisions: [bf16, nf4]
reference: bf16
traits: [pv/evil]
methods: [mean_diff]
"""


def _run(views: list[SteerView]) -> RunArtefacts:
    spec = spec_from_bytes(SPEC)
    return RunArtefacts(
        run_id="r",
        spec=spec,
        variants=variants_of(spec),
        extractions={},
        steer=views,
        logit_diff=[],
        benchmarks=[],
        probes=[],
        inputs={},
        missing={},
        notes=[],
        loader_notes={},
    )


def test_steering_comparison_on_held_out_scores_noise_and_imported_sets() -> None:
    ref = _view(
        "m@bf16", [60] * 4, BASE, held_out=_held([40] * 4, BASE), noise=_noise(3.0)
    )  # held-out effect 30, band 8.31
    nf4 = _view("m@nf4", [35] * 4, BASE, held_out=_held([34] * 4, BASE))  # held-out effect 24
    imported = {"source": "imported-x", "method": "imported"}
    imp_ref = _view("m@bf16", [50] * 4, BASE, key="runs/r/i/bf16", **imported)
    imp_nf4 = _view("m@nf4", [20] * 4, BASE, key="runs/r/i/nf4", **imported)
    doc = steering_comparison(_run([ref, nf4, imp_ref, imp_nf4]))
    by = {(e.target, e.source): e for e in doc.entries}
    own = by[("m@nf4", "m@nf4")]
    assert own.degradation_pct is not None and own.degradation_pct["score_basis"] == "held_out"
    assert own.degradation_pct["value"] == pytest.approx(20.0)  # in sample it would be 50%
    # 20% is degraded by the threshold, but 6 points is inside the reference's band.
    assert own.classification is not None and own.classification.class_ == "robust"
    assert own.classification.within_noise and own.held_out is not None
    assert by[("m@bf16", "m@bf16")].noise is not None
    # The imported set is compared with the reference model steered with the same set.
    assert by[("m@bf16", "imported-x")].is_reference
    imp = by[("m@nf4", "imported-x")]
    assert imp.degradation_pct is not None and imp.degradation_pct["value"] == pytest.approx(75.0)
    assert imp.classification is not None and imp.classification.class_ == "broken"
    # The across-precision spread compares held-out scores (40 vs 34).
    self_spread = next(s for s in doc.spread if s["steering"] == "self")
    assert self_spread["score_basis"] == "held_out"
    assert self_spread["best_score"]["spread"] == pytest.approx(6.0)
    # The ranking of precisions rests on extracted vectors only: the imported 75% is left out.
    ranking = build_all(_run([ref, nf4, imp_ref, imp_nf4])).ranking
    (nf4_rank,) = ranking.precisions
    assert nf4_rank.mean_degradation_pct["value"] == pytest.approx(20.0)
    assert nf4_rank.mean_degradation_pct["n"] == 1
    # Methods: the held-out sample size is stated.
    methods = methods_section(_run([ref, nf4]), doc)
    texts = [t for b in methods if isinstance(b, Bullets | Paragraph) for t in _texts(b)]
    assert any("Held-out steering questions" in t and "pv/evil: 4" in t for t in texts), texts


def test_each_imported_set_is_compared_with_the_reference_steered_by_the_same_set() -> None:
    """Two imported sets of one trait share the method ``imported``: neither set's variants
    may be measured against the other set's reference run, nor spread together."""
    views = [
        _view(t, s, BASE, key=f"runs/r/{n}/{t}", source=f"imported-{n}", method="imported")
        for n, t, s in (
            ("a", "m@bf16", [60] * 4),
            ("a", "m@nf4", [45] * 4),
            ("b", "m@bf16", [30] * 4),
            ("b", "m@nf4", [25] * 4),
        )
    ]
    doc = steering_comparison(_run(views))
    by = {(e.target, e.source): e for e in doc.entries}
    assert by[("m@bf16", "imported-a")].is_reference and by[("m@bf16", "imported-b")].is_reference
    for name, want in (("a", 30.0), ("b", 25.0)):  # BASE 10: effects 50 vs 35, 20 vs 15
        deg = by[("m@nf4", f"imported-{name}")].degradation_pct
        assert deg is not None and deg["value"] == pytest.approx(want), name
    spreads = [s for s in doc.spread if s["steering"] == "reference_vectors"]
    assert sorted(len(s["sources"]) for s in spreads) == [2, 2]


def _texts(block: Bullets | Paragraph) -> list[str]:
    return list(block.items) if isinstance(block, Bullets) else [block.text]
