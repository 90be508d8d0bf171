"""The analyzer's statistics: seeded bootstrap intervals, Wilson, and scipy's tests as plain JSON.

Every interval is an :class:`Estimate` (``value, low, high, n, level, method``; the same field
names as the steerer's ``Interval``), every test a :class:`TestResult`. Bootstraps are
percentile intervals over *units* (questions, items, prompts) drawn with numpy's PCG64 from an
explicit seed, so a rerun reproduces every number. Tests return ``None`` fields with a
``reason`` instead of raising when there is too little data (n < 3, constant input), because a
study cell with two questions must still be reported, not crash the analysis.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "Estimate",
    "TestResult",
    "bootstrap",
    "bootstrap_diff",
    "finite_pairs",
    "fisher_z_mean",
    "mann_whitney",
    "mcnemar",
    "one_sample_t",
    "pearson",
    "spearman",
    "wilcoxon",
    "wilson",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95

F64 = NDArray[np.float64]
Alternative = Literal["two-sided", "greater", "less"]


def _clean(x: float | None) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval over ``n`` units."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    level: float = DEFAULT_LEVEL
    method: str = "percentile-bootstrap"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("value", "low", "high"):
            out[key] = _clean(out[key])
        return out

    @classmethod
    def empty(cls, method: str, n: int = 0, level: float = DEFAULT_LEVEL) -> Estimate:
        return cls(None, None, None, n, level, method)


@dataclass(frozen=True)
class TestResult:
    """A hypothesis test or correlation: statistic, p-value, n, and why it is missing if so."""

    test: str
    statistic: float | None
    p_value: float | None
    n: int
    alternative: str = "two-sided"
    ci: tuple[float | None, float | None] | None = None
    reason: str | None = None
    extra: dict[str, Any] | None = None

    __test__ = False  # not a pytest class

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "test": self.test,
            "statistic": _clean(self.statistic),
            "p_value": _clean(self.p_value),
            "n": self.n,
            "alternative": self.alternative,
        }
        if self.ci is not None:
            out["ci"] = [_clean(self.ci[0]), _clean(self.ci[1])]
        if self.reason is not None:
            out["reason"] = self.reason
        if self.extra:
            out.update(self.extra)
        return out


def _finite(values: Sequence[float | None] | F64) -> F64:
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def finite_pairs(
    x: Sequence[float | None] | F64, y: Sequence[float | None] | F64
) -> tuple[F64, F64]:
    """Keep positions where both ``x[i]`` and ``y[i]`` are finite numbers."""
    if len(x) != len(y):
        raise ValueError(f"paired values differ in length: {len(x)} != {len(y)}")
    a = np.asarray([np.nan if v is None else float(v) for v in x], dtype=np.float64)
    b = np.asarray([np.nan if v is None else float(v) for v in y], dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _percentile_interval(samples: F64, level: float) -> tuple[float | None, float | None]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None, None
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap(
    values: Sequence[float | None] | F64,
    statistic: Callable[[F64], F64] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Estimate:
    """``statistic`` (default: mean) of the finite values with a percentile-bootstrap interval.

    ``statistic`` maps ``[B, n]`` resampled rows to ``[B]`` values (vectorised); it is also
    applied to ``values[None, :]`` for the point estimate.
    """
    x = _finite(values)
    stat = statistic or (lambda m: m.mean(axis=1))
    if x.size == 0:
        return Estimate.empty("percentile-bootstrap", level=level)
    point = float(stat(x[None, :])[0])
    if x.size == 1:
        return Estimate(point, point, point, 1, level, "exact (n = 1)")
    idx = _rng(seed).integers(0, x.size, size=(resamples, x.size))
    low, high = _percentile_interval(np.asarray(stat(x[idx]), dtype=np.float64), level)
    return Estimate(point, low, high, int(x.size), level, "percentile-bootstrap")


def bootstrap_diff(
    a: Sequence[float | None] | F64,
    b: Sequence[float | None] | F64,
    *,
    paired: bool,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Estimate:
    """``mean(a) - mean(b)``: paired (units where both are finite) or independent resampling."""
    if paired:
        x, y = finite_pairs(a, b)
        return bootstrap(x - y, resamples=resamples, seed=seed, level=level)
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0:
        return Estimate.empty("percentile-bootstrap (independent)", n=int(min(x.size, y.size)))
    point = float(x.mean() - y.mean())
    if x.size == 1 and y.size == 1:
        return Estimate(point, point, point, 1, level, "exact (n = 1)")
    rng = _rng(seed)
    mx = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    my = y[rng.integers(0, y.size, size=(resamples, y.size))].mean(axis=1)
    low, high = _percentile_interval(mx - my, level)
    return Estimate(
        point, low, high, int(min(x.size, y.size)), level, "percentile-bootstrap (independent)"
    )


def wilson(successes: int, n: int, *, level: float = DEFAULT_LEVEL) -> Estimate:
    """A proportion with its Wilson score interval."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return Estimate.empty("wilson", level=level)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, level, "wilson")


def _too_few(test: str, n: int, need: int, alternative: str = "two-sided") -> TestResult:
    return TestResult(test, None, None, n, alternative, reason=f"n = {n} < {need}")


def _constant(values: F64) -> bool:
    return values.size > 0 and bool(np.all(values == values[0]))


def pearson(
    x: Sequence[float | None] | F64,
    y: Sequence[float | None] | F64,
    *,
    level: float = DEFAULT_LEVEL,
) -> TestResult:
    """Pearson r over finite pairs (scipy), with its Fisher-z confidence interval."""
    from scipy import stats

    a, b = finite_pairs(x, y)
    if a.size < 3:
        return _too_few("pearson", int(a.size), 3)
    if _constant(a) or _constant(b):
        return TestResult("pearson", None, None, int(a.size), reason="constant input")
    res = stats.pearsonr(a, b)
    ci = res.confidence_interval(confidence_level=level)
    return TestResult(
        "pearson",
        float(res.statistic),
        float(res.pvalue),
        int(a.size),
        ci=(float(ci.low), float(ci.high)),
        extra={"ci_method": "fisher-z"},
    )


def spearman(x: Sequence[float | None] | F64, y: Sequence[float | None] | F64) -> TestResult:
    """Spearman rho over finite pairs (scipy)."""
    from scipy import stats

    a, b = finite_pairs(x, y)
    if a.size < 3:
        return _too_few("spearman", int(a.size), 3)
    if _constant(a) or _constant(b):
        return TestResult("spearman", None, None, int(a.size), reason="constant input")
    res = stats.spearmanr(a, b)
    return TestResult("spearman", float(res.statistic), float(res.pvalue), int(a.size))


def mann_whitney(
    a: Sequence[float | None] | F64,
    b: Sequence[float | None] | F64,
    *,
    alternative: Alternative = "two-sided",
) -> TestResult:
    """Mann–Whitney U of two independent groups (scipy, asymptotic or exact as scipy picks).

    ``extra.effect_size`` is the common-language effect size U / (n_a n_b) = P(A > B).
    """
    from scipy import stats

    x, y = _finite(a), _finite(b)
    if x.size < 1 or y.size < 1 or x.size + y.size < 3:
        return _too_few("mann_whitney", int(x.size + y.size), 3, alternative)
    res = stats.mannwhitneyu(x, y, alternative=alternative)
    return TestResult(
        "mann_whitney",
        float(res.statistic),
        float(res.pvalue),
        int(x.size + y.size),
        alternative,
        extra={
            "n_a": int(x.size),
            "n_b": int(y.size),
            "effect_size": float(res.statistic) / float(x.size * y.size),
        },
    )


def one_sample_t(
    values: Sequence[float | None] | F64,
    popmean: float,
    *,
    alternative: Alternative = "two-sided",
) -> TestResult:
    """One-sample t-test of the finite values against ``popmean`` (scipy)."""
    from scipy import stats

    x = _finite(values)
    if x.size < 2:
        return _too_few("one_sample_t", int(x.size), 2, alternative)
    if _constant(x):
        return TestResult(
            "one_sample_t", None, None, int(x.size), alternative, reason="constant input"
        )
    res = stats.ttest_1samp(x, popmean, alternative=alternative)
    return TestResult(
        "one_sample_t",
        float(res.statistic),
        float(res.pvalue),
        int(x.size),
        alternative,
        extra={"popmean": popmean, "df": int(x.size - 1), "mean": float(x.mean())},
    )


def wilcoxon(
    a: Sequence[float | None] | F64,
    b: Sequence[float | None] | F64,
    *,
    alternative: Alternative = "two-sided",
) -> TestResult:
    """Wilcoxon signed-rank test of paired ``a - b`` (scipy; zero differences dropped)."""
    from scipy import stats

    x, y = finite_pairs(a, b)
    d = x - y
    nonzero = int(np.count_nonzero(d))
    if nonzero < 3:
        return _too_few("wilcoxon", nonzero, 3, alternative)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about exactness with ties
        res = stats.wilcoxon(x, y, alternative=alternative)
    return TestResult("wilcoxon", float(res.statistic), float(res.pvalue), int(d.size), alternative)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> TestResult:
    """Exact McNemar test on paired correctness (binomial test on the discordant pairs)."""
    from scipy import stats

    if len(a_correct) != len(b_correct):
        raise ValueError("paired correctness lists differ in length")
    only_a = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if y and not x)
    discordant = only_a + only_b
    extra = {"only_a_correct": only_a, "only_b_correct": only_b}
    if discordant == 0:
        return TestResult(
            "mcnemar_exact", 0.0, 1.0, len(a_correct), reason="no discordant pairs", extra=extra
        )
    res = stats.binomtest(only_a, discordant, 0.5)
    return TestResult(
        "mcnemar_exact", float(only_a), float(res.pvalue), len(a_correct), extra=extra
    )


def fisher_z_mean(rs: Sequence[float | None]) -> float | None:
    """Average of correlations through Fisher's z (clipped away from ±1)."""
    vals = _finite(rs)
    if vals.size == 0:
        return None
    z = np.arctanh(np.clip(vals, -0.999999, 0.999999))
    return float(np.tanh(z.mean()))
