"""What the analysis reads from each steerer result, and how gptq/awq checkpoints were made.

Every steerer ``result.json`` is validated against its contract
(:mod:`services.common.contracts.steer_results`: ``SteerResult``, ``LogitDiffResult``,
``BenchmarkResult``, ``ProbeResult``) with ``model_validate``; a document of another schema
version or one that does not validate is refused with ``FailedPrecondition`` naming the key,
and the run's notes say so. The *views* (:class:`SteerView`, :class:`LogitDiffView`,
:class:`BenchmarkView`, :class:`ProbeView`) keep the fields the analysis uses, with
non-finite numbers as None; the fields read are documented on each view and in
docs/ARTEFACTS.md (``## analyzer``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from services.common.contracts import steer_results as contract
from services.common.contracts.common import Interval
from services.common.errors import FailedPrecondition

__all__ = [
    "KNOWN_SCHEMAS",
    "PROBE_METRICS",
    "BenchmarkView",
    "LogitDiffView",
    "ProbeView",
    "SteerRun",
    "SteerView",
    "check_schema",
    "finite_or_none",
    "int_or_none",
    "parse_benchmark",
    "parse_logit_diff",
    "parse_probe",
    "parse_steer",
    "per_question_scores",
    "validate_result",
]

_M = TypeVar("_M", bound=BaseModel)


def finite_or_none(value: Any) -> float | None:
    """A finite float or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def int_or_none(value: Any) -> int | None:
    v = finite_or_none(value)
    return None if v is None else int(v)


def _bounds(interval: Interval | None) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) of an interval, non-finite numbers as None."""
    if interval is None:
        return None, None, None
    return (
        finite_or_none(interval.value),
        finite_or_none(interval.low),
        finite_or_none(interval.high),
    )


KNOWN_SCHEMAS = {
    "steer": contract.STEER_SCHEMA,
    "logit_diff": contract.LOGIT_DIFF_SCHEMA,
    "benchmark": contract.BENCHMARK_SCHEMA,
    "probe": contract.PROBE_SCHEMA,
}
_CONTRACTS: dict[str, type[BaseModel]] = {
    "steer": contract.SteerResult,
    "logit_diff": contract.LogitDiffResult,
    "benchmark": contract.BenchmarkResult,
    "probe": contract.ProbeResult,
}


def check_schema(raw: Mapping[str, Any], stage: str, key: str) -> None:
    """FailedPrecondition when ``schema_version`` is present and not the version we read."""
    version = raw.get("schema_version")
    if version is not None and version != KNOWN_SCHEMAS[stage]:
        raise FailedPrecondition(
            f"{key}: schema_version {version!r} is not {KNOWN_SCHEMAS[stage]!r}; "
            "this analyzer cannot read it"
        )


def validate_result(raw: Any, stage: str, key: str, model: type[_M]) -> _M:
    """``raw`` as the ``stage`` result contract ``model``; FailedPrecondition names the key."""
    if not isinstance(raw, Mapping):
        raise FailedPrecondition(f"{key}: not a JSON object")
    check_schema(raw, stage, key)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FailedPrecondition(
            f"{key}: not a valid {stage} result ({where}: {first['msg']})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Steering.


@dataclass(frozen=True)
class SteerRun:
    """One evaluated setting of a steer job (``SteerResult.runs[]``)."""

    run_index: int
    layer: int | None
    coefficient: float
    trait: float | None
    coherence: float | None
    phase: str = ""
    eligible: bool = True
    coherent: bool = False
    added_norm: float | None = None
    relative_norm: float | None = None
    question_set: str = ""
    vector_layer: int | None = None


@dataclass
class SteerView:
    """What the analysis reads from a steer ``result.json`` (``SteerResult``).

    ``best.{run_index, layer, vector_layer, coefficient, added_norm, relative_norm, mean_trait,
    mean_coherence, trait_ci, delta, delta_ci}``, ``baseline.{mean_trait, trait_ci, key}``,
    ``runs[]``, ``budget``, ``objective``, ``status``, ``coherence_threshold``, ``judge``,
    ``questions.{kind, count}``, ``bootstrap``. Per-question trait scores (``trait.used`` by
    question ``index``) come from ``runs.jsonl`` (the best run's answers) and the baseline's
    ``answers.jsonl`` when those objects exist.
    """

    key: str
    target: str
    source: str
    trait: str
    method: str
    vector_mode: str
    mode: str
    direction: str
    objective: str
    status: str
    best_run_index: int | None
    best_layer: int | None
    best_vector_layer: int | None
    best_coefficient: float | None
    best_added_norm: float | None
    best_score: float | None
    best_low: float | None
    best_high: float | None
    best_coherence: float | None
    baseline_score: float | None
    baseline_low: float | None
    baseline_high: float | None
    baseline_key: str | None
    delta: float | None
    delta_low: float | None
    delta_high: float | None
    runs: list[SteerRun]
    budget: dict[str, Any]
    coherence_threshold: float | None
    judge: dict[str, Any]
    n_questions: int | None
    question_set: str
    bootstrap: dict[str, Any]
    best_per_question: dict[str, float | None] | None = None
    baseline_per_question: dict[str, float | None] | None = None
    per_question_keys: list[str] = field(default_factory=list)
    # The best setting re-scored on held-out questions, and (reference only) its noise floor.
    held_out: contract.HeldOutScore | None = None
    noise: contract.NoiseFloor | None = None

    @property
    def self_steered(self) -> bool:
        return self.source == self.target

    @property
    def effective_layer(self) -> int | None:
        """The steered layer, or for ablation (every layer) the layer of the ablated vector."""
        return self.best_layer if self.best_layer is not None else self.best_vector_layer

    @property
    def runs_key(self) -> str:
        return self.key.rsplit("/", 1)[0] + "/runs.jsonl"


def _steer_run(row: contract.SteerRun) -> SteerRun:
    return SteerRun(
        run_index=row.run_index,
        layer=row.layer,
        coefficient=float(row.coefficient),
        trait=finite_or_none(row.mean_trait),
        coherence=finite_or_none(row.mean_coherence),
        phase=row.phase,
        eligible=row.eligible,
        coherent=row.coherent,
        added_norm=finite_or_none(row.added_norm),
        relative_norm=finite_or_none(row.relative_norm),
        question_set=row.question_set,
        vector_layer=row.vector_layer,
    )


def parse_steer(
    result: contract.SteerResult,
    *,
    key: str,
    target: str,
    source: str,
    trait: str,
    method: str,
    vector_mode: str,
    mode: str,
    direction: str,
) -> SteerView:
    """A :class:`SteerView` of one steer result (identity fields come from the key)."""
    best, baseline = result.best, result.baseline
    _, b_low, b_high = _bounds(best.trait_ci) if best else (None, None, None)
    _, d_low, d_high = _bounds(best.delta_ci) if best else (None, None, None)
    _, base_low, base_high = _bounds(baseline.trait_ci)
    return SteerView(
        key=key,
        target=target,
        source=source,
        trait=trait,
        method=method,
        vector_mode=vector_mode,
        mode=mode,
        direction=direction,
        objective=result.objective,
        status=result.status,
        best_run_index=best.run_index if best else None,
        best_layer=best.layer if best else None,
        best_vector_layer=best.vector_layer if best else None,
        best_coefficient=finite_or_none(best.coefficient) if best else None,
        best_added_norm=finite_or_none(best.added_norm) if best else None,
        best_score=finite_or_none(best.mean_trait) if best else None,
        best_low=b_low,
        best_high=b_high,
        best_coherence=finite_or_none(best.mean_coherence) if best else None,
        baseline_score=finite_or_none(baseline.mean_trait),
        baseline_low=base_low,
        baseline_high=base_high,
        baseline_key=baseline.key or None,
        delta=finite_or_none(best.delta) if best else None,
        delta_low=d_low,
        delta_high=d_high,
        runs=[_steer_run(row) for row in result.runs],
        budget=result.budget.model_dump(mode="json"),
        coherence_threshold=finite_or_none(result.coherence_threshold),
        judge=result.judge.model_dump(mode="json"),
        n_questions=result.questions.count,
        question_set=result.questions.kind,
        bootstrap=dict(result.bootstrap),
        held_out=result.held_out,
        noise=result.noise,
    )


def per_question_scores(answers: Iterable[contract.Answer]) -> dict[str, float | None]:
    """``trait.used`` by question ``index`` (a run's answers, or a baseline's rows)."""
    return {str(a.index): finite_or_none(a.trait.used) for a in answers}


# ---------------------------------------------------------------------------------------------
# Logit difference, benchmarks, probes.


@dataclass
class LogitDiffView:
    """What the analysis reads from a logit_diff ``result.json`` (``LogitDiffResult``).

    ``multiples[]`` (the alignment key across variants: coefficients are in units of each
    variant's own vector norm), ``coefficients[]``, ``items[].{item_id, values[]}``,
    ``per_coefficient[].mean`` (Interval), ``slope`` (Slope), ``unsteered``, ``layer``, ``n``.
    """

    key: str
    variant: str
    source: str
    trait: str
    method: str
    vector_mode: str
    layer: int | None
    multiples: list[float]
    coefficients: list[float]
    per_question: dict[str, list[float | None]]
    mean: list[float | None]
    slope: float | None
    slope_low: float | None
    slope_high: float | None
    unsteered: float | None = None


def parse_logit_diff(
    result: contract.LogitDiffResult,
    *,
    key: str,
    variant: str,
    source: str,
    trait: str,
    method: str,
    vector_mode: str,
) -> LogitDiffView:
    """A :class:`LogitDiffView` of one logit-difference result."""
    coefficients = [c for c in (finite_or_none(x) for x in result.coefficients) if c is not None]
    multiples = [c for c in (finite_or_none(x) for x in result.multiples) if c is not None]
    if len(multiples) != len(coefficients):
        multiples = list(coefficients)
    per_question = {row.item_id: [finite_or_none(v) for v in row.values] for row in result.items}
    mean = [finite_or_none(c.mean.value) for c in result.per_coefficient]
    if len(mean) != len(multiples) and per_question:
        matrix = np.asarray(
            [[np.nan if v is None else v for v in row] for row in per_question.values()],
            dtype=np.float64,
        )
        with np.errstate(invalid="ignore"):
            mean = [finite_or_none(x) for x in np.nanmean(matrix, axis=0)] if matrix.size else []
    slope = result.slope
    return LogitDiffView(
        key=key,
        variant=variant,
        source=source,
        trait=trait,
        method=method,
        vector_mode=vector_mode,
        layer=result.layer,
        multiples=multiples,
        coefficients=coefficients,
        per_question=per_question,
        mean=mean,
        slope=finite_or_none(slope.value),
        slope_low=finite_or_none(slope.low),
        slope_high=finite_or_none(slope.high),
        unsteered=finite_or_none(result.unsteered.value),
    )


@dataclass
class BenchmarkView:
    """What the analysis reads from a benchmark ``result.json`` (``BenchmarkResult``).

    ``accuracy`` (Interval in [0, 1]), ``n``, ``metric``, ``format``, ``items[].{id, correct}``.
    """

    key: str
    variant: str
    name: str
    accuracy: float | None
    low: float | None
    high: float | None
    n: int | None
    items: dict[str, bool] | None
    format: str = ""
    metric: str = ""


def parse_benchmark(
    result: contract.BenchmarkResult, *, key: str, variant: str, name: str
) -> BenchmarkView:
    """A :class:`BenchmarkView` of one benchmark result."""
    acc, low, high = _bounds(result.accuracy)
    items = {row.id: row.correct for row in result.items}
    if acc is None and items:
        acc = sum(items.values()) / len(items)
    return BenchmarkView(
        key=key,
        variant=variant,
        name=name,
        accuracy=acc,
        low=low,
        high=high,
        n=result.n,
        items=items,
        format=result.format,
        metric=result.metric,
    )


PROBE_METRICS: tuple[str, ...] = (
    "entropy",
    "top1",
    "top5",
    "gini",
    "logit_range",
    "p_refusal_start",
)


@dataclass
class ProbeView:
    """What the analysis reads from a probe ``result.json`` (``ProbeResult``).

    Top-level Intervals ``entropy, top1, top5, gini, logit_range, refusal_rate``;
    ``calibration.{ece, brier, mean_confidence}``; ``templates.{diversity,
    top_prefix_share}``; ``items[].{index, entropy, top1, top5, gini, logit_range,
    p_refusal_start, refused}``; ``n``.
    """

    key: str
    variant: str
    name: str
    aggregate: dict[str, float | None]
    per_prompt: dict[str, dict[str, float | None]]
    refused: dict[str, bool]
    refusal_rate: float | None
    refusal_low: float | None
    refusal_high: float | None
    calibration: dict[str, float | None]
    prefix_diversity: float | None
    top_prefix_share: float | None
    n: int


def parse_probe(result: contract.ProbeResult, *, key: str, variant: str, name: str) -> ProbeView:
    """A :class:`ProbeView` of one safety-probe result."""
    per_prompt: dict[str, dict[str, float | None]] = {}
    refused: dict[str, bool] = {}
    for row in result.items:
        rid = str(row.index)
        per_prompt[rid] = {m: finite_or_none(getattr(row, m)) for m in PROBE_METRICS}
        refused[rid] = row.refused
    aggregate: dict[str, float | None] = {
        m: finite_or_none(getattr(result, m).value) if hasattr(result, m) else None
        for m in PROBE_METRICS
    }
    for m in PROBE_METRICS:
        if aggregate[m] is None and per_prompt:
            vals = [x for x in (v[m] for v in per_prompt.values()) if x is not None]
            aggregate[m] = float(np.mean(vals)) if vals else None
    rate, r_low, r_high = _bounds(result.refusal_rate)
    if rate is None and refused:
        rate = sum(refused.values()) / len(refused)
    calibration = result.calibration
    return ProbeView(
        key=key,
        variant=variant,
        name=name,
        aggregate=aggregate,
        per_prompt=per_prompt,
        refused=refused,
        refusal_rate=rate,
        refusal_low=r_low,
        refusal_high=r_high,
        calibration={
            k: finite_or_none(calibration.get(k)) for k in ("ece", "brier", "mean_confidence")
        },
        prefix_diversity=finite_or_none(result.templates.diversity),
        top_prefix_share=finite_or_none(result.templates.top_prefix_share),
        n=result.n or len(per_prompt),
    )
