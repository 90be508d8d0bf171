"""Per-cell math on planted vectors and activations: cosine, norm ratio, energy, safety neurons."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from services.analyzer.documents.safety_neurons import refusal_direction, safety_neuron_errors
from services.analyzer.documents.steering_cells import degradation, matched_coherence
from services.analyzer.documents.vectors import compare_vectors
from services.analyzer.geometry import depth_layer, layer_window, safety_layers, snap_layer
from services.analyzer.loading import Activations
from services.analyzer.views import SteerRun, SteerView
from tests.analyzer.planted import vector_set


def _pair(
    cosines: list[float], ratios: list[float], h: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(len(cosines), h))
    var = np.zeros_like(ref)
    for i, (c, r) in enumerate(zip(cosines, ratios, strict=True)):
        u = ref[i] / np.linalg.norm(ref[i])
        w = rng.normal(size=h)
        w -= np.dot(w, u) * u
        w /= np.linalg.norm(w)
        var[i] = r * np.linalg.norm(ref[i]) * (c * u + np.sqrt(1 - c * c) * w)
    return ref, var


def test_planted_cosines_and_norm_ratios_come_back_exactly() -> None:
    cosines = [0.99, 0.9, 0.5, -0.2, 0.0, 0.97, 0.96, 0.8, 0.7, 1.0]
    ratios = [1.0, 2.0, 0.5, 1.0, 3.0, 1.1, 0.9, 1.0, 1.0, 1.0]
    ref, var = _pair(cosines, ratios, h=16)
    out = compare_vectors(vector_set(ref, "m"), vector_set(var, "m"), window=[2, 3, 4])
    assert out["layers"] == list(range(10))
    assert out["cosine"] == pytest.approx(cosines, abs=1e-6)
    assert out["norm_ratio"] == pytest.approx(ratios, abs=1e-6)
    assert out["window"]["layers"] == [2, 3, 4]
    assert out["window"]["mean_cosine"] == pytest.approx(np.mean([0.5, -0.2, 0.0]), abs=1e-6)
    assert out["window"]["min_cosine"] == pytest.approx(-0.2, abs=1e-6)
    assert out["window"]["mean_norm_ratio"] == pytest.approx(np.mean([0.5, 1.0, 3.0]), abs=1e-6)
    # Massive-dim energy: the share of squared norm in dims 0..3 (the planted massive dims).
    expected = (var[:, :4] ** 2).sum(1) / (var**2).sum(1)
    assert out["massive_dim_energy"]["variant"] == pytest.approx(list(expected), abs=1e-6)
    assert out["null_layers"] == []


def test_zero_norm_layers_are_null_with_a_reason_and_left_out_of_the_mean() -> None:
    ref, var = _pair([0.9] * 10, [1.0] * 10, h=16)
    var[3] = 0.0
    ref[5] = 0.0
    out = compare_vectors(vector_set(ref, "m"), vector_set(var, "m"), window=[3, 4, 5, 6])
    assert out["cosine"][3] is None and out["cosine"][5] is None
    assert out["norm_ratio"][5] is None and out["norm_ratio"][3] == 0.0
    assert {n["layer"]: n["reason"] for n in out["null_layers"]} == {
        3: "zero-norm variant vector",
        5: "zero-norm reference vector",
    }
    assert out["window"]["n_layers_with_cosine"] == 2
    assert out["window"]["mean_cosine"] == pytest.approx(0.9, abs=1e-6)


def test_all_null_window_and_non_finite_vectors_never_raise() -> None:
    ref, var = _pair([0.9] * 10, [1.0] * 10, h=16)
    var[:] = np.nan
    vs = vector_set(ref, "m")
    bad = vector_set(var, "m")
    out = compare_vectors(vs, bad, window=[2, 3])
    assert all(c is None for c in out["cosine"])
    assert out["window"]["mean_cosine"] is None and out["window"]["min_cosine"] is None
    assert "non-finite variant activations" in out["null_layers"][0]["reason"]


def test_layer_window_depth_and_snapping() -> None:
    assert layer_window(range(10), 10, (0.2, 0.8)) == [2, 3, 4, 5, 6, 7]
    assert layer_window(range(30), 30, (0.2, 0.8)) == list(range(6, 24))
    assert layer_window([0, 5, 10, 15, 20, 25, 29], 30, (0.2, 0.8)) == [10, 15, 20]
    assert depth_layer(0.65, 30) == 19  # round(0.65 * 29) = round(18.85)
    assert snap_layer(19, [0, 5, 10, 15, 20, 25]) == 20
    assert snap_layer(12, [10, 14]) == 10  # a tie goes to the shallower layer
    assert safety_layers(range(30), 30) == [6, 10, 14, 19, 23]  # 5.8, 10.15, 14.5, 18.85, 23.2
    assert safety_layers(range(10), 10) == [2, 3, 4, 6, 7]


def test_refusal_direction_cosine_and_magnitude() -> None:
    ref, var = _pair([0.5] * 10, [1.0] * 10, h=16)
    var[6] *= 0.0
    var[6] += 2.0 * ref[6]  # same direction, twice as long
    out = refusal_direction(vector_set(ref, "mean_diff"), vector_set(var, "mean_diff"), 6)
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["norm_ratio"] == pytest.approx(2.0, abs=1e-6)
    assert refusal_direction(vector_set(ref, "m"), vector_set(var, "m"), 42)["cosine"] is None


def _acts(seed: int, n: int = 10, layers: int = 3, h: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = {
        g: rng.normal(size=(n, layers, h)).astype(np.float32) for g in ("train_pos", "train_neg")
    }
    groups["train_pos"][:, :, :2] += 5.0  # dims 0 and 1 carry the contrast
    return groups


def test_safety_neuron_ratio_and_t_test_against_an_independent_computation() -> None:
    ref_groups = _acts(0)
    rng = np.random.default_rng(1)
    var_groups = {}
    for g, a in ref_groups.items():
        noise = rng.normal(scale=0.1, size=a.shape)
        noise[:, :, :2] *= 4.0
        var_groups[g] = (a + noise).astype(np.float32)
    ids = {g: [f"{g}{i}" for i in range(10)] for g in ref_groups}
    ref = Activations("ref", (3, 5, 7), ref_groups, ids)
    var = Activations("var", (3, 5, 7), var_groups, ids)
    out = safety_neuron_errors(ref, var, [3, 5, 7], resamples=300, seed=4)
    # Independent: top 5% of 40 dims = 2 per layer, chosen on the reference's contrast.
    contrast = np.abs(ref_groups["train_pos"].mean(0) - ref_groups["train_neg"].mean(0))
    top = np.argsort(-contrast, axis=1)[:, :2]
    assert all(set(t) == {0, 1} for t in top)
    a_ref = np.concatenate([ref_groups["train_pos"], ref_groups["train_neg"]]).astype(np.float64)
    a_var = np.concatenate([var_groups["train_pos"], var_groups["train_neg"]]).astype(np.float64)
    err = np.abs(a_var - a_ref)
    safety = err[:, :, :2].reshape(20, -1).mean(1)
    other = err[:, :, 2:].reshape(20, -1).mean(1)
    ratio = safety / other
    t = sp.ttest_1samp(ratio, 1.0, alternative="greater")
    assert out["n"] == 20 and out["neurons_per_layer"] == 2
    assert out["ratio"]["value"] == pytest.approx(ratio.mean(), rel=1e-9)
    assert out["t_test"]["statistic"] == pytest.approx(t.statistic, rel=1e-9)
    assert out["t_test"]["p_value"] == pytest.approx(t.pvalue, rel=1e-9)
    assert out["t_test"]["alternative"] == "greater"
    assert 3.0 < out["ratio"]["value"] < 5.0
    mw = sp.mannwhitneyu(safety, other, alternative="greater")
    assert out["mann_whitney"]["p_value"] == pytest.approx(mw.pvalue)
    assert out["alignment"] == {
        "matched": 20,
        "reference_only": 0,
        "variant_only": 0,
        "reordered": False,
    }


def test_safety_neurons_align_rows_by_pair_id() -> None:
    ref_groups = _acts(0)
    var_groups = {g: a + 0.01 for g, a in ref_groups.items()}
    ids = {g: [f"{g}{i}" for i in range(10)] for g in ref_groups}
    ref = Activations("ref", (3, 5, 7), ref_groups, ids)
    straight = safety_neuron_errors(ref, Activations("v", (3, 5, 7), var_groups, ids), [3, 5, 7])
    perm = np.random.default_rng(3).permutation(10)
    shuffled = Activations(
        "v",
        (3, 5, 7),
        {g: a[perm] for g, a in var_groups.items()},
        {g: [v[i] for i in perm] for g, v in ids.items()},
    )
    out = safety_neuron_errors(ref, shuffled, [3, 5, 7])
    assert out["alignment"]["reordered"] is True
    assert out["ratio"]["value"] == pytest.approx(straight["ratio"]["value"])
    # A variant missing rows: only the shared inputs are compared.
    fewer = Activations(
        "v",
        (3, 5, 7),
        {g: a[:6] for g, a in var_groups.items()},
        {g: v[:6] for g, v in ids.items()},
    )
    assert safety_neuron_errors(ref, fewer, [3, 5, 7])["alignment"]["reference_only"] == 8


def _view(**kw: object) -> SteerView:
    base: dict[str, object] = dict(
        key="k",
        target="m@nf4",
        source="m@nf4",
        trait="pv/evil",
        method="mean_diff",
        vector_mode="replay",
        mode="add",
        direction="+",
        objective="max",
        status="ok",
        best_run_index=1,
        best_layer=4,
        best_vector_layer=4,
        best_coefficient=3.0,
        best_added_norm=6.0,
        best_score=None,
        best_low=None,
        best_high=None,
        best_coherence=80.0,
        baseline_score=None,
        baseline_low=None,
        baseline_high=None,
        baseline_key=None,
        delta=None,
        delta_low=None,
        delta_high=None,
        runs=[],
        budget={},
        coherence_threshold=70.0,
        judge={},
        n_questions=4,
        question_set="eval",
        bootstrap={},
    )
    base.update(kw)
    return SteerView(**base)  # type: ignore[arg-type]


def test_degradation_math_and_its_paired_interval() -> None:
    base = {str(i): 50.0 for i in range(4)}
    ref = _view(
        delta=40.0,
        best_per_question={"0": 90.0, "1": 88.0, "2": 92.0, "3": 90.0},
        baseline_per_question=base,
    )
    var = _view(
        delta=30.0,
        best_per_question={"0": 80.0, "1": 78.0, "2": 82.0, "3": 80.0},
        baseline_per_question=base,
    )
    out = degradation(ref, var, 500, 0)
    assert out["value"] == pytest.approx(25.0)
    assert out["low"] <= 25.0 <= out["high"]
    assert out["n"] == 4
    # Steering away (objective min): a delta of -40 is an effect of 40.
    away = degradation(
        _view(delta=-40.0, objective="min"), _view(delta=-10.0, objective="min"), 100, 0
    )
    assert away["value"] == pytest.approx(75.0) and away["low"] is None
    none = degradation(_view(delta=-5.0), _view(delta=3.0), 100, 0)
    assert none["value"] is None and "not positive" in none["reason"]


def test_matched_coherence_uses_the_added_norm_at_the_reference_best_layer() -> None:
    ref = _view(
        best_layer=4, best_added_norm=6.0, runs=[SteerRun(1, 4, 3.0, 90.0, 80.0, added_norm=6.0)]
    )
    var = _view(
        runs=[
            SteerRun(0, 4, 2.0, 50.0, 95.0, added_norm=6.3),
            SteerRun(1, 4, 4.0, 70.0, 40.0, added_norm=9.0),
            SteerRun(2, 5, 3.0, 70.0, 10.0, added_norm=6.0),
        ]
    )
    out = matched_coherence(ref, var)
    assert out["matched_on"] == "added_norm"
    assert out["coherence"] == 95.0 and out["relative_gap"] == pytest.approx(0.05)
    far = _view(runs=[SteerRun(0, 4, 2.0, 50.0, 95.0, added_norm=9.0)])
    assert matched_coherence(ref, far)["coherence"] is None
    assert (
        matched_coherence(ref, _view(runs=[]))["reason"] == "the variant has no run at that layer"
    )


def test_degradation_needs_a_reference_effect_distinguishable_from_zero() -> None:
    def view(delta: float, low: float, high: float) -> SteerView:
        return _view(delta=delta, delta_low=low, delta_high=high, objective="min", mode="ablate",
                     direction="-", best_per_question=None, baseline_per_question=None)  # fmt: skip

    var = view(13.0, 5.0, 20.0)
    # Ablation (objective min): a reference delta of -1.8 with CI [-11, 8] is no effect.
    out = degradation(view(-1.8, -11.0, 8.0), var, resamples=200, seed=0)
    assert out["value"] is None and "includes 0" in out["reason"]
    # A clear reference effect gives a percentage: effects 20 vs -13 -> 165% degradation.
    out = degradation(view(-20.0, -30.0, -10.0), var, resamples=200, seed=0)
    assert out["value"] == pytest.approx((20.0 - (-13.0)) / 20.0 * 100.0)
