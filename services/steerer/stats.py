"""Confidence intervals for the steerer's numbers: bootstrap over questions, Wilson for accuracy,
least-squares slope with a bootstrap interval.

Every bootstrap is seeded (numpy PCG64) and resamples *questions* (rows), never answers within a
question, so the interval says how much a mean would move on another draw of questions of the
same kind. Intervals are percentile intervals at ``level`` (default 0.95). Missing values
(``None``/NaN: unscorable answers) are dropped before resampling and counted by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

from services.common.contracts.common import DEFAULT_LEVEL, Interval, Slope

__all__ = [
    "Interval",
    "Slope",
    "bootstrap_mean",
    "bootstrap_paired_delta",
    "bootstrap_slope",
    "finite",
    "wilson",
]

DEFAULT_RESAMPLES = 1000


def finite(values: Sequence[float | None]) -> NDArray[np.float64]:
    """The finite values as a float64 array (None and NaN dropped)."""
    out = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(out, dtype=np.float64)


def _empty(method: str, level: float) -> Interval:
    return Interval(value=None, low=None, high=None, n=0, level=level, method=method)


def _percentiles(samples: NDArray[np.float64], level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_mean(
    values: Sequence[float | None],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Interval:
    """Mean of the finite ``values`` with a percentile-bootstrap interval."""
    x = finite(values)
    if x.size == 0:
        return _empty("percentile-bootstrap", level)
    mean = float(x.mean())
    if x.size == 1:
        return Interval(value=mean, low=mean, high=mean, n=1, level=level, method="exact")
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    low, high = _percentiles(x[idx].mean(axis=1), level)
    return Interval(
        value=mean, low=low, high=high, n=int(x.size), level=level, method="percentile-bootstrap"
    )


def bootstrap_paired_delta(
    treated: Sequence[float | None],
    control: Sequence[float | None],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Interval:
    """Mean of ``treated[i] - control[i]`` over units where both are finite, bootstrapped."""
    if len(treated) != len(control):
        raise ValueError(f"paired values differ in length: {len(treated)} != {len(control)}")
    diffs: list[float | None] = []
    for t, c in zip(treated, control, strict=True):
        if t is None or c is None or not (math.isfinite(t) and math.isfinite(c)):
            continue
        diffs.append(float(t) - float(c))
    return bootstrap_mean(diffs, resamples=resamples, seed=seed, level=level)


def wilson(successes: int, n: int, *, level: float = DEFAULT_LEVEL) -> Interval:
    """A proportion with its Wilson score interval (good at small n and near 0 or 1)."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return _empty("wilson", level)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(
        value=p,
        low=max(0.0, centre - half),
        high=min(1.0, centre + half),
        n=n,
        level=level,
        method="wilson",
    )


def _ols(x: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[float, float]:
    """Slope and intercept of y on x (broadcast over leading axes of y)."""
    xm = x.mean()
    dx = x - xm
    sxx = float((dx * dx).sum())
    if sxx == 0.0:
        raise ValueError("slope needs at least two distinct x values")
    slope = float(((y - y.mean()) * dx).sum() / sxx)
    return slope, float(y.mean() - slope * xm)


def bootstrap_slope(
    x: Sequence[float],
    values: Sequence[Sequence[float | None]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Slope:
    """Slope of per-unit ``values[i][k]`` on ``x[k]`` (pooled OLS = slope of the mean curve).

    Units with a missing value at any x are dropped. The interval resamples units.
    """
    xs = np.asarray(x, dtype=np.float64)
    rows = [r for r in values if len(r) == xs.size and all(v is not None for v in r)]
    matrix = np.asarray([[float(v) for v in r] for r in rows], dtype=np.float64)  # type: ignore[arg-type]
    if matrix.size and not np.isfinite(matrix).all():
        matrix = matrix[np.isfinite(matrix).all(axis=1)]
    n = int(matrix.shape[0]) if matrix.ndim == 2 else 0
    if n == 0 or xs.size < 2 or np.unique(xs).size < 2:
        return Slope(value=None, low=None, high=None, intercept=None, r2=None, n=n, level=level)
    curve = matrix.mean(axis=0)
    slope, intercept = _ols(xs, curve)
    pooled_x = np.tile(xs, n)
    pooled_y = matrix.reshape(-1)
    residual = pooled_y - (intercept + slope * pooled_x)
    total = pooled_y - pooled_y.mean()
    ss_tot = float((total * total).sum())
    r2 = 1.0 - float((residual * residual).sum()) / ss_tot if ss_tot > 0 else None
    if n == 1:
        return Slope(
            value=slope, low=slope, high=slope, intercept=intercept, r2=r2, n=1, level=level
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, n, size=(resamples, n))
    curves = matrix[idx].mean(axis=1)  # [B, K]
    dx = xs - xs.mean()
    slopes = ((curves - curves.mean(axis=1, keepdims=True)) * dx).sum(axis=1) / float(
        (dx * dx).sum()
    )
    low, high = _percentiles(slopes, level)
    return Slope(value=slope, low=low, high=high, intercept=intercept, r2=r2, n=n, level=level)
