"""DESIGN.md's thresholds, boundaries included, and the interval annotations."""

from __future__ import annotations

import pytest

from services.analyzer.classify import (
    THRESHOLDS,
    classify,
    classify_benchmark_drop,
    classify_cosine,
    classify_logit_correlation,
    classify_steering_degradation,
)


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (0.999, "robust"),
        (0.9501, "robust"),
        (0.95, "degraded"),
        (0.85, "degraded"),
        (0.80, "degraded"),
        (0.7999, "broken"),
        (-0.3, "broken"),
    ],
)
def test_cosine(value: float, label: str) -> None:
    assert classify_cosine(value).label == label


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (-20.0, "robust"),
        (0.0, "robust"),
        (9.99, "robust"),
        (10.0, "degraded"),
        (30.0, "degraded"),
        (30.01, "broken"),
    ],
)
def test_steering_degradation(value: float, label: str) -> None:
    assert classify_steering_degradation(value).label == label


@pytest.mark.parametrize(
    ("value", "label"),
    [(-2.0, "robust"), (0.99, "robust"), (1.0, "degraded"), (3.0, "degraded"), (3.5, "broken")],
)
def test_benchmark_drop(value: float, label: str) -> None:
    assert classify_benchmark_drop(value).label == label


@pytest.mark.parametrize(
    ("value", "label"),
    [(0.95, "robust"), (0.90, "degraded"), (0.70, "degraded"), (0.69, "broken")],
)
def test_logit_correlation(value: float, label: str) -> None:
    assert classify_logit_correlation(value).label == label


def test_missing_values_are_not_classified() -> None:
    for value in (None, float("nan"), float("inf")):
        c = classify_cosine(value)
        assert c.label == "n/a" and c.value is None and c.to_json()["reason"] == "no value"
    c = classify_steering_degradation(None, reason="reference effect not positive")
    assert c.to_json()["reason"] == "reference effect not positive"


def test_interval_that_straddles_a_threshold_is_not_settled() -> None:
    settled = classify_cosine(0.97, 0.96, 0.99).to_json()
    assert settled["settled"] is True and settled["ci_classes"] == ["robust", "robust"]
    loose = classify_benchmark_drop(2.0, 0.5, 3.5).to_json()
    assert loose["class"] == "degraded"
    assert loose["settled"] is False and loose["ci_classes"] == ["robust", "broken"]
    assert "settled" not in classify_cosine(0.9).to_json()


def test_thresholds_are_the_design_table() -> None:
    table = {m: (t.robust, t.broken, t.higher_is_better) for m, t in THRESHOLDS.items()}
    assert table == {
        "vector_cosine": (0.95, 0.80, True),
        "steering_degradation_pct": (10.0, 30.0, False),
        "benchmark_drop_pp": (1.0, 3.0, False),
        "logit_diff_correlation": (0.90, 0.70, True),
    }
    assert THRESHOLDS["benchmark_drop_pp"].to_json()["broken"] == "> 3 pp"
    with pytest.raises(KeyError):
        classify("unknown_metric", 1.0)
