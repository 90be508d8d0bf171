"""Robust / degraded / broken: DESIGN.md's threshold table as data, one function per metric.

| metric                          | robust  | degraded   | broken  |
|---------------------------------|---------|------------|---------|
| vector cosine vs reference      | > 0.95  | 0.80–0.95  | < 0.80  |
| steering delta degradation      | < 10%   | 10–30%     | > 30%   |
| benchmark accuracy drop         | < 1 pp  | 1–3 pp     | > 3 pp  |
| logit-difference correlation    | > 0.90  | 0.70–0.90  | < 0.70  |

Boundaries belong to *degraded* (cosine exactly 0.95 is degraded, exactly 0.80 is degraded; a
drop of exactly 1 pp or 3 pp is degraded). An improvement (negative degradation or drop) is
robust. A missing or non-finite value is ``n/a``. A classification carries the value and, where
there is one, its confidence interval and the classes of the interval's ends, so a reader sees
when the interval straddles a threshold (``settled: false``).

Steering degradation also knows the reference's noise floor (``steering.noise``): where a
variant's steering effect lies within the noise band of the reference's (the band inside which
the reference differs from itself when only questions, sampling seeds or the judge change), the
difference is not a difference and the cell is *robust* whatever its percentage
(``within_noise: true``, the band in ``noise_band``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "THRESHOLDS",
    "Classification",
    "Label",
    "Threshold",
    "classify",
    "classify_benchmark_drop",
    "classify_cosine",
    "classify_logit_correlation",
    "classify_steering_degradation",
    "with_noise_band",
]

Label = Literal["robust", "degraded", "broken", "n/a"]
ORDER: dict[str, int] = {"robust": 0, "degraded": 1, "broken": 2}


@dataclass(frozen=True)
class Threshold:
    """Where robust ends and broken begins for one metric."""

    metric: str
    description: str
    unit: str
    higher_is_better: bool
    robust: float  # strictly beyond this (in the good direction): robust
    broken: float  # strictly beyond this (in the bad direction): broken

    def label(self, value: float | None) -> Label:
        if value is None or not math.isfinite(value):
            return "n/a"
        if self.higher_is_better:
            if value > self.robust:
                return "robust"
            return "broken" if value < self.broken else "degraded"
        if value < self.robust:
            return "robust"
        return "broken" if value > self.broken else "degraded"

    def to_json(self) -> dict[str, Any]:
        good, bad = (">", "<") if self.higher_is_better else ("<", ">")
        lo, hi = sorted((self.robust, self.broken))
        unit = {"": "", "%": "%", "pp": " pp"}.get(self.unit, f" {self.unit}")
        return {
            "metric": self.metric,
            "description": self.description,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "robust_beyond": self.robust,
            "broken_beyond": self.broken,
            "robust": f"{good} {self.robust:g}{unit}",
            "degraded": f"{lo:g}–{hi:g}{unit}",
            "broken": f"{bad} {self.broken:g}{unit}",
        }


THRESHOLDS: dict[str, Threshold] = {
    t.metric: t
    for t in (
        Threshold("vector_cosine", "vector cosine vs reference", "", True, 0.95, 0.80),
        Threshold("steering_degradation_pct", "steering delta degradation", "%", False, 10.0, 30.0),
        Threshold("benchmark_drop_pp", "benchmark accuracy drop", "pp", False, 1.0, 3.0),
        Threshold("logit_diff_correlation", "logit-difference correlation", "", True, 0.90, 0.70),
    )
}


@dataclass(frozen=True)
class Classification:
    """A cell's class with the metric value it rests on and its interval."""

    metric: str
    value: float | None
    label: Label
    low: float | None = None
    high: float | None = None
    reason: str | None = None
    noise_band: float | None = None  # effect points; steering degradation only
    within_noise: bool | None = None

    @property
    def interval_labels(self) -> tuple[Label, Label] | None:
        if self.low is None or self.high is None:
            return None
        t = THRESHOLDS[self.metric]
        return t.label(self.low), t.label(self.high)

    @property
    def settled(self) -> bool | None:
        """Whether the whole interval lies in one class (None without an interval)."""
        labels = self.interval_labels
        if labels is None:
            return None
        return labels[0] == labels[1] == self.label

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "value": self.value, "class": self.label}
        if self.low is not None and self.high is not None:
            labels = self.interval_labels
            out["ci"] = [self.low, self.high]
            out["ci_classes"] = list(labels) if labels else None
            out["settled"] = self.settled
        if self.reason:
            out["reason"] = self.reason
        if self.noise_band is not None:
            out["noise_band"] = self.noise_band
            out["within_noise"] = self.within_noise
        return out


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def classify(
    metric: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    reason: str | None = None,
) -> Classification:
    """Classify ``value`` of ``metric`` (a key of THRESHOLDS)."""
    if metric not in THRESHOLDS:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(THRESHOLDS)}")
    v = _finite(value)
    label = THRESHOLDS[metric].label(v)
    if label == "n/a" and reason is None:
        reason = "no value"
    return Classification(metric, v, label, _finite(low), _finite(high), reason)


def classify_cosine(
    value: float | None, low: float | None = None, high: float | None = None
) -> Classification:
    """Vector cosine vs the reference: > 0.95 robust, 0.80–0.95 degraded, < 0.80 broken."""
    return classify("vector_cosine", value, low, high)


def classify_steering_degradation(
    pct: float | None,
    low: float | None = None,
    high: float | None = None,
    reason: str | None = None,
) -> Classification:
    """Steering delta degradation in %: < 10 robust, 10–30 degraded, > 30 broken."""
    return classify("steering_degradation_pct", pct, low, high, reason)


def classify_benchmark_drop(
    drop_pp: float | None, low: float | None = None, high: float | None = None
) -> Classification:
    """Benchmark accuracy drop in percentage points: < 1 robust, 1–3 degraded, > 3 broken."""
    return classify("benchmark_drop_pp", drop_pp, low, high)


def classify_logit_correlation(
    r: float | None, low: float | None = None, high: float | None = None
) -> Classification:
    """Logit-difference correlation vs the reference: > 0.90 robust, 0.70–0.90, < 0.70."""
    return classify("logit_diff_correlation", r, low, high)


def with_noise_band(
    c: Classification, difference: float | None, band: float | None
) -> Classification:
    """``c`` judged against the noise band: robust when ``|difference| <= band``.

    ``difference`` is the reference's steering effect minus the variant's, in trait points;
    ``band`` the reference's noise band in the same points. Without either, ``c`` is unchanged.
    """
    d, b = _finite(difference), _finite(band)
    if d is None or b is None:
        return c
    within = abs(d) <= b
    if not within or c.label in ("robust", "n/a"):
        return replace(c, noise_band=b, within_noise=within)
    return replace(
        c,
        label="robust",
        noise_band=b,
        within_noise=True,
        reason=f"{c.label} by its threshold, but the effect differs from the reference's by "
        f"{d:.3g} points, inside the noise band of ±{b:.3g}",
    )
