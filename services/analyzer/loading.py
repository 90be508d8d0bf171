"""Read one run's artefacts from S3 into typed objects for the comparison builders.

The analyzer reads only from the store: the spec (job params or ``spec.json``), every
extraction's ``summary.json`` and ``vectors/<method>.safetensors``, the steerer's
``result.json`` files (steer, logit_diff, benchmark, probe), the quantize job's ``result.json``
of each platform-quantized gptq/awq variant, and, for refusal (``arditi``) traits, the layers
of ``activations.safetensors`` that the safety-neuron analysis needs.
Everything it read is listed in :attr:`RunArtefacts.inputs` with its SHA-256, so each number
in the report can be traced back to the objects it came from.

A run may disable stages or still be missing results (a dead-lettered job, an on-demand report
of a running run): what the plan expects but the bucket does not hold is collected in
:attr:`RunArtefacts.missing` and :attr:`RunArtefacts.notes`, and the report says so.

Steerer results are read through *views* (:class:`SteerView`, :class:`LogitDiffView`,
:class:`BenchmarkView`, :class:`ProbeView`) that pick the fields the analysis needs out of
the JSON and tolerate absent optional fields; the field names are documented on each view and
in docs/ARTEFACTS.md (``## analyzer``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from services.common.artefacts import (
    ExtractSummary,
    extract_key,
    quantize_key,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jobs import JobKind
from services.common.planner import PlannedVariant, build_plan, variants_of
from services.common.spec import ExperimentSpec
from services.common.store import AsyncS3Store, run_key, run_prefix
from services.common.tensor_codec import load_safetensors
from services.extractor.methods import VectorSet
from services.steerer.params import (
    BenchmarkParams,
    LogitDiffParams,
    SteerParams,
    benchmark_result_key,
    logit_diff_result_key,
    parse_params,
    steer_result_key,
)

__all__ = [
    "KNOWN_SCHEMAS",
    "PROBE_METRICS",
    "Activations",
    "BenchmarkView",
    "Extraction",
    "LogitDiffView",
    "ProbeView",
    "QuantizeView",
    "RunArtefacts",
    "SteerRun",
    "SteerView",
    "check_schema",
    "depth_layer",
    "load_run",
    "parse_benchmark",
    "parse_logit_diff",
    "parse_probe",
    "parse_quantize",
    "parse_steer",
    "per_question_scores",
]

_CONCURRENCY = 8
_V = TypeVar("_V")
F32 = NDArray[np.float32]


# ---------------------------------------------------------------------------------------------
# Small readers shared by the views.


def _num(value: Any) -> float | None:
    """A finite float or None (accepts ints, floats, numeric strings, None)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    v = _num(value)
    return None if v is None else int(v)


def _interval(value: Any) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) from an Interval dict, a bare number, or ``{mean, ci: [lo, hi]}``."""
    if isinstance(value, Mapping):
        point = _num(value.get("value", value.get("mean", value.get("score"))))
        low, high = _num(value.get("low")), _num(value.get("high"))
        ci = value.get("ci")
        if (low is None or high is None) and isinstance(ci, Sequence) and len(ci) == 2:
            low, high = _num(ci[0]), _num(ci[1])
        return point, low, high
    return _num(value), None, None


def _first(mapping: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in mapping and mapping[name] is not None:
            return mapping[name]
    return None


def depth_layer(depth: float, num_layers: int) -> int:
    """The layer index at relative ``depth`` of a model with ``num_layers`` layers."""
    return round(depth * (num_layers - 1))


# ---------------------------------------------------------------------------------------------
# Extractions.


@dataclass
class Activations:
    """Captured activations of one extraction, restricted to the layers the analysis needs.

    ``groups`` maps ``train_pos``/``train_neg``/``val_pos``/``val_neg`` to ``[n, L', H]``
    (``L'`` = ``len(layers)``), ``pair_ids`` the same names to the ids of their rows.
    """

    key: str
    layers: tuple[int, ...]
    groups: dict[str, F32]
    pair_ids: dict[str, list[str]]


@dataclass
class Extraction:
    """One extraction (variant x trait x vector mode): its summary and vectors."""

    variant: str
    trait: str
    mode: str
    summary: ExtractSummary
    summary_key: str
    vectors: dict[str, VectorSet]
    vector_keys: dict[str, str]
    activations: Activations | None = None

    @property
    def num_layers(self) -> int:
        """The model's layer count (loader info when recorded, else the deepest captured + 1)."""
        recorded = _int(self.summary.loader.get("num_layers"))
        deepest = max(self.summary.layers) + 1 if self.summary.layers else 0
        return max(recorded or 0, deepest)


# ---------------------------------------------------------------------------------------------
# Steerer result views (schemas: services/steerer/results.py; fields read: docs/ARTEFACTS.md).

KNOWN_SCHEMAS = {
    "steer": "qsens.steer/1",
    "logit_diff": "qsens.logit_diff/1",
    "benchmark": "qsens.benchmark/1",
    "probe": "qsens.probe/1",
}


def check_schema(raw: Mapping[str, Any], stage: str, key: str) -> None:
    """FailedPrecondition when ``schema_version`` is present and not the version we read."""
    version = raw.get("schema_version")
    if version is not None and version != KNOWN_SCHEMAS[stage]:
        raise FailedPrecondition(
            f"{key}: schema_version {version!r} is not {KNOWN_SCHEMAS[stage]!r}; "
            "this analyzer cannot read it"
        )


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


def parse_steer(
    raw: Mapping[str, Any],
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
    check_schema(raw, "steer", key)
    best = raw.get("best") or {}
    baseline = raw.get("baseline") or {}
    if not isinstance(best, Mapping) or not isinstance(baseline, Mapping):
        raise InvalidArgument(f"{key}.best", "best and baseline must be objects or null")
    b_score = _num(_first(best, "mean_trait", "score"))
    _, b_low, b_high = _interval(best.get("trait_ci"))
    base = _num(_first(baseline, "mean_trait", "score"))
    _, base_low, base_high = _interval(baseline.get("trait_ci"))
    delta = _num(best.get("delta"))
    _, d_low, d_high = _interval(best.get("delta_ci"))
    runs: list[SteerRun] = []
    for i, row in enumerate(raw.get("runs") or []):
        if not isinstance(row, Mapping) or _num(row.get("coefficient")) is None:
            continue
        runs.append(
            SteerRun(
                run_index=_int(row.get("run_index")) or i,
                layer=_int(row.get("layer")),
                coefficient=float(row["coefficient"]),
                trait=_num(row.get("mean_trait")),
                coherence=_num(row.get("mean_coherence")),
                phase=str(row.get("phase", "")),
                eligible=bool(row.get("eligible", True)),
                coherent=bool(row.get("coherent", False)),
                added_norm=_num(row.get("added_norm")),
                relative_norm=_num(row.get("relative_norm")),
                question_set=str(row.get("question_set", "")),
                vector_layer=_int(row.get("vector_layer")),
            )
        )
    questions = raw.get("questions") if isinstance(raw.get("questions"), Mapping) else {}
    objective = str(raw.get("objective") or ("min" if direction == "-" else "max"))
    return SteerView(
        key=key,
        target=target,
        source=source,
        trait=trait,
        method=method,
        vector_mode=vector_mode,
        mode=mode,
        direction=direction,
        objective=objective,
        status=str(raw.get("status", "ok" if best else "no_coherent_run")),
        best_run_index=_int(best.get("run_index")),
        best_layer=_int(best.get("layer")),
        best_vector_layer=_int(best.get("vector_layer")),
        best_coefficient=_num(best.get("coefficient")),
        best_added_norm=_num(best.get("added_norm")),
        best_score=b_score,
        best_low=b_low,
        best_high=b_high,
        best_coherence=_num(best.get("mean_coherence")),
        baseline_score=base,
        baseline_low=base_low,
        baseline_high=base_high,
        baseline_key=str(baseline["key"]) if baseline.get("key") else None,
        delta=delta,
        delta_low=d_low,
        delta_high=d_high,
        runs=runs,
        budget=dict(raw.get("budget") or {}),
        coherence_threshold=_num(raw.get("coherence_threshold")),
        judge=dict(raw.get("judge") or {}),
        n_questions=_int((questions or {}).get("count")),
        question_set=str((questions or {}).get("kind", "")),
        bootstrap=dict(raw.get("bootstrap") or {}),
    )


def per_question_scores(rows: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """``trait.used`` by question ``index`` from answer rows (runs.jsonl answers, baseline)."""
    out: dict[str, float | None] = {}
    for row in rows:
        verdict = row.get("trait")
        if isinstance(verdict, Mapping) and row.get("index") is not None:
            out[str(row["index"])] = _num(verdict.get("used"))
    return out


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
    raw: Mapping[str, Any],
    *,
    key: str,
    variant: str,
    source: str,
    trait: str,
    method: str,
    vector_mode: str,
) -> LogitDiffView:
    """A :class:`LogitDiffView` of one logit-difference result."""
    check_schema(raw, "logit_diff", key)
    coefficients = [c for c in (_num(x) for x in raw.get("coefficients") or []) if c is not None]
    multiples = [c for c in (_num(x) for x in raw.get("multiples") or []) if c is not None]
    if len(multiples) != len(coefficients):
        multiples = list(coefficients)
    per_question: dict[str, list[float | None]] = {}
    for i, row in enumerate(raw.get("items") or []):
        if isinstance(row, Mapping):
            qid = _first(row, "item_id", "id")
            per_question[str(i if qid is None else qid)] = [
                _num(v) for v in (row.get("values") or [])
            ]
    mean = [_interval(c.get("mean"))[0] for c in raw.get("per_coefficient") or []]
    if len(mean) != len(multiples) and per_question:
        matrix = np.asarray(
            [[np.nan if v is None else v for v in row] for row in per_question.values()],
            dtype=np.float64,
        )
        with np.errstate(invalid="ignore"):
            mean = [_num(x) for x in np.nanmean(matrix, axis=0)] if matrix.size else []
    slope, s_low, s_high = _interval(raw.get("slope"))
    return LogitDiffView(
        key=key,
        variant=variant,
        source=source,
        trait=trait,
        method=method,
        vector_mode=vector_mode,
        layer=_int(raw.get("layer")),
        multiples=multiples,
        coefficients=coefficients,
        per_question=per_question,
        mean=mean,
        slope=slope,
        slope_low=s_low,
        slope_high=s_high,
        unsteered=_interval(raw.get("unsteered"))[0],
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


def parse_benchmark(raw: Mapping[str, Any], *, key: str, variant: str, name: str) -> BenchmarkView:
    """A :class:`BenchmarkView` of one benchmark result."""
    check_schema(raw, "benchmark", key)
    acc, low, high = _interval(raw.get("accuracy"))
    items: dict[str, bool] | None = None
    rows = raw.get("items")
    if isinstance(rows, Sequence) and not isinstance(rows, str):
        items = {}
        for i, row in enumerate(rows):
            if isinstance(row, Mapping) and "correct" in row:
                rid = row.get("id")
                items[str(i if rid is None else rid)] = bool(row["correct"])
    n = _int(raw.get("n"))
    if n is None and items is not None:
        n = len(items)
    if acc is None and items:
        acc = sum(items.values()) / len(items)
    return BenchmarkView(
        key=key,
        variant=variant,
        name=name,
        accuracy=acc,
        low=low,
        high=high,
        n=n,
        items=items,
        format=str(raw.get("format", "")),
        metric=str(raw.get("metric", "")),
    )


# Per-prompt statistics of a probe result that the analysis compares across precisions.
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


def parse_probe(raw: Mapping[str, Any], *, key: str, variant: str, name: str) -> ProbeView:
    """A :class:`ProbeView` of one safety-probe result."""
    check_schema(raw, "probe", key)
    per_prompt: dict[str, dict[str, float | None]] = {}
    refused: dict[str, bool] = {}
    for i, row in enumerate(raw.get("items") or []):
        if not isinstance(row, Mapping):
            continue
        pid = row.get("index")
        rid = str(i if pid is None else pid)
        per_prompt[rid] = {m: _num(row.get(m)) for m in PROBE_METRICS}
        if row.get("refused") is not None:
            refused[rid] = bool(row["refused"])
    aggregate: dict[str, float | None] = {m: _interval(raw.get(m))[0] for m in PROBE_METRICS}
    for m in PROBE_METRICS:
        if aggregate[m] is None and per_prompt:
            vals = [x for x in (v[m] for v in per_prompt.values()) if x is not None]
            aggregate[m] = float(np.mean(vals)) if vals else None
    rate, r_low, r_high = _interval(raw.get("refusal_rate"))
    if rate is None and refused:
        rate = sum(refused.values()) / len(refused)
    calibration_raw = raw.get("calibration") if isinstance(raw.get("calibration"), Mapping) else {}
    templates = raw.get("templates") if isinstance(raw.get("templates"), Mapping) else {}
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
            k: _num((calibration_raw or {}).get(k)) for k in ("ece", "brier", "mean_confidence")
        },
        prefix_diversity=_num((templates or {}).get("diversity")),
        top_prefix_share=_num((templates or {}).get("top_prefix_share")),
        n=_int(raw.get("n")) or len(per_prompt),
    )


# ---------------------------------------------------------------------------------------------
# Quantization of gptq/awq variants.


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    if value is None or value == "" or value == "unknown":
        return None
    return str(value)


@dataclass(frozen=True)
class QuantizeView:
    """How a gptq/awq variant's checkpoint was made and served.

    Read from the quantize job's ``result.json`` (``services.quantizer.handler.record_result``:
    ``method``, ``settings {bits, group_size, sym, desc_act}``, ``checkpoint``, ``reused``,
    ``from``, ``calibration {name, sha256, bytes, samples, tokens}``, ``quantize_seconds``,
    ``libraries.gptqmodel``) and from the loader's ``Info.quantization_config`` recorded in
    the variant's extraction summaries (``kernel``, ``compute_dtype``, ``made_by``, and the
    same settings and calibration fields, the only source for a published checkpoint).
    ``key`` is the ``result.json`` read, None when only the loader's record exists.
    """

    variant: str
    key: str | None
    method: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    desc_act: bool | None = None
    checkpoint: str | None = None
    made_by: str = "unknown"  # "platform", "published" or "unknown"
    calibration_source: str | None = None
    calibration_sha256: str | None = None
    calibration_bytes: int | None = None
    calibration_samples: int | None = None
    calibration_tokens: int | None = None
    quantize_seconds: float | None = None
    reused: bool | None = None
    reused_from: str | None = None
    gptqmodel: str | None = None
    kernel: str | None = None
    compute_dtype: str | None = None
    loader_source: str | None = None  # the summary.json the loader fields came from


def parse_quantize(
    raw: Mapping[str, Any] | None,
    loader: Mapping[str, Any] | None,
    *,
    variant: str,
    key: str | None,
    loader_source: str | None = None,
) -> QuantizeView:
    """One variant's :class:`QuantizeView` from its quantize result and/or its loader's Info."""
    result = raw or {}
    loader = loader or {}
    qc = loader.get("quantization_config")
    qc = qc if isinstance(qc, Mapping) else {}
    settings = result.get("settings")
    settings = settings if isinstance(settings, Mapping) else {}
    cal = result.get("calibration")
    cal = cal if isinstance(cal, Mapping) else {}
    libraries = result.get("libraries")
    libraries = libraries if isinstance(libraries, Mapping) else {}
    made_by = str(qc.get("made_by", ""))
    if raw is not None or made_by == "qsens quantize job":
        origin = "platform"
    elif made_by == "published checkpoint":
        origin = "published"
    else:
        origin = "unknown"

    def setting(name: str) -> Any:
        return settings[name] if name in settings else qc.get(name)

    method = str(result.get("method") or qc.get("method") or variant.rpartition("@")[2])
    return QuantizeView(
        variant=variant,
        key=key,
        method=method,
        bits=_int(setting("bits")),
        group_size=_int(setting("group_size")),
        sym=_bool(setting("sym")),
        desc_act=_bool(setting("desc_act")) if method == "gptq" else None,  # GPTQ's alone
        checkpoint=_str(result.get("checkpoint") or qc.get("checkpoint")),
        made_by=origin,
        calibration_source=_str(cal.get("name")),
        calibration_sha256=_str(cal.get("sha256") or qc.get("calibration_sha256")),
        calibration_bytes=_int(cal.get("bytes")),
        calibration_samples=_int(cal.get("samples") or qc.get("calibration_samples")),
        calibration_tokens=_int(cal.get("tokens") or qc.get("calibration_tokens")),
        quantize_seconds=_num(result.get("quantize_seconds")),
        reused=_bool(result.get("reused")),
        reused_from=_str(result.get("from")),
        gptqmodel=_str(libraries.get("gptqmodel") or qc.get("quantizer")),
        kernel=_str(qc.get("kernel")),
        compute_dtype=_str(qc.get("compute_dtype") or loader.get("dtype")),
        loader_source=loader_source if qc else None,
    )


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class RunArtefacts:
    """Everything the analysis reads about one run."""

    run_id: str
    spec: ExperimentSpec
    variants: list[PlannedVariant]
    extractions: dict[tuple[str, str, str], Extraction]  # (variant, trait, mode)
    steer: list[SteerView]
    logit_diff: list[LogitDiffView]
    benchmarks: list[BenchmarkView]
    probes: list[ProbeView]
    inputs: dict[str, str]  # key -> sha256 of the bytes read
    missing: dict[str, list[str]]  # stage -> expected keys not in the bucket
    notes: list[str]
    loader_notes: dict[str, list[str]]  # variant -> the loader's notes
    # gptq/awq variant -> how its checkpoint was made and served (empty without such variants)
    quantization: dict[str, QuantizeView] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return self.spec.reference.value

    def reference_of(self, model: str) -> str:
        return f"{model}@{self.spec.reference.value}"

    def variant(self, variant_id: str) -> PlannedVariant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise NotFound(f"variant {variant_id} is not in the run's plan")

    def models(self) -> list[str]:
        return list(dict.fromkeys(v.model.name for v in self.variants))


class _Reader:
    """Reads objects (bounded concurrency) and records each one's SHA-256."""

    def __init__(self, store: AsyncS3Store) -> None:
        self.store = store
        self.inputs: dict[str, str] = {}
        self.slots = asyncio.Semaphore(_CONCURRENCY)

    async def bytes(self, key: str) -> bytes:
        async with self.slots:
            data = await self.store.get_bytes(key)
        self.inputs[key] = hashlib.sha256(data).hexdigest()
        return data

    async def json(self, key: str) -> Any:
        return json.loads(await self.bytes(key))

    async def jsonl(self, key: str) -> list[Any]:
        text = (await self.bytes(key)).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _present(values: Iterable[_V | None]) -> list[_V]:
    return [v for v in values if v is not None]


def _parse_key(prefix: str, key: str) -> list[str] | None:
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) < 3 or "@" not in parts[0]:
        return None
    return parts


def _expected(spec: ExperimentSpec, run_id: str) -> dict[str, list[str]]:
    """Result keys the run's plan will write, per stage (probes: the variant's probe folder)."""
    out: dict[str, list[str]] = {
        "extract": [],
        "steer": [],
        "logit_diff": [],
        "benchmark": [],
        "probe": [],
        "quantize": [],
    }
    for job in build_plan(spec, run_id).jobs:
        p = job.params
        if job.kind is JobKind.QUANTIZE:
            # The quantizer records it under the variant <model>@<method>.
            out["quantize"].append(
                quantize_key(run_id, f"{p['model']}@{p['method']}", "result.json")
            )
        elif job.kind is JobKind.EXTRACT:
            out["extract"].append(
                extract_key(run_id, p["variant"], p["trait"]["name"], p["mode"], "summary.json")
            )
        elif job.kind is JobKind.STEER:
            out["steer"].append(steer_result_key(run_id, parse_params(SteerParams, p)))
        elif job.kind is JobKind.LOGIT_DIFF:
            out["logit_diff"].append(
                logit_diff_result_key(run_id, parse_params(LogitDiffParams, p))
            )
        elif job.kind is JobKind.BENCHMARK:
            out["benchmark"].append(benchmark_result_key(run_id, parse_params(BenchmarkParams, p)))
        elif job.kind is JobKind.PROBE:
            out["probe"].append(run_key(run_id, p["variant"], "probe") + "/")
    return out


def _activation_layers(spec: ExperimentSpec, layers: Sequence[int], num_layers: int) -> list[int]:
    """Captured layers the safety analysis uses: refusal depth and five in [20%, 80%]."""
    from services.analyzer.matrices import safety_layers, snap_layer

    wanted = {snap_layer(depth_layer(spec.analysis.refusal_depth, num_layers), layers)}
    wanted.update(safety_layers(layers, num_layers))
    return sorted(wanted)


async def _load_activations(reader: _Reader, key: str, keep: Sequence[int]) -> Activations:
    tensors, metadata = load_safetensors(await reader.bytes(key))
    layers = [int(x) for x in json.loads(metadata.get("layers", "[]"))]
    pair_ids_raw = json.loads(metadata.get("pair_ids", "{}"))
    index = [layers.index(layer) for layer in keep if layer in layers]
    groups: dict[str, F32] = {}
    for name in ("train_pos", "train_neg", "val_pos", "val_neg"):
        if name in tensors:
            arr = tensors[name]
            groups[name] = np.ascontiguousarray(arr[:, index], dtype=np.float32)
    return Activations(
        key=key,
        layers=tuple(layers[i] for i in index),
        groups=groups,
        pair_ids={str(k): [str(x) for x in v] for k, v in pair_ids_raw.items()},
    )


async def load_run(
    store: AsyncS3Store,
    run_id: str,
    *,
    spec: ExperimentSpec | None = None,
    variants: Sequence[str] | None = None,
) -> RunArtefacts:
    """Read every artefact of ``run_id`` that the analysis uses (see the module docstring)."""
    reader = _Reader(store)
    if spec is None:
        try:
            spec = ExperimentSpec.model_validate(await reader.json(run_key(run_id, "spec.json")))
        except NotFound:
            raise NotFound(
                f"run {run_id}: no spec.json in the bucket (was it submitted?)"
            ) from None
    planned = variants_of(spec)
    if variants is not None:
        wanted = set(variants)
        planned = [v for v in planned if v.id in wanted]
    variant_ids = {v.id for v in planned}
    prefix = run_prefix(run_id)
    keys = await store.list_keys(prefix)
    present = set(keys)
    notes: list[str] = []

    # -- extractions ------------------------------------------------------------------------
    summary_keys: list[tuple[str, str, str, str]] = []
    steer_keys: list[tuple[str, list[str]]] = []
    ld_keys: list[tuple[str, list[str]]] = []
    bench_keys: list[tuple[str, list[str]]] = []
    probe_keys: list[tuple[str, list[str]]] = []
    quantize_keys: dict[str, str] = {}  # variant -> its quantize result.json
    for key in keys:
        parts = _parse_key(prefix, key)
        if parts is None or parts[0] not in variant_ids:
            continue
        stage = parts[1]
        if stage == "extract" and len(parts) == 6 and parts[5] == "summary.json":
            summary_keys.append((key, parts[0], f"{parts[2]}/{parts[3]}", parts[4]))
        elif stage == "steer" and len(parts) == 8 and parts[7] == "result.json":
            steer_keys.append((key, parts))
        elif stage == "logit_diff" and len(parts) == 7 and parts[6] == "result.json":
            ld_keys.append((key, parts))
        elif stage == "benchmark" and len(parts) == 4 and parts[3] == "result.json":
            bench_keys.append((key, parts))
        elif stage == "probe" and len(parts) == 4 and parts[3] == "result.json":
            probe_keys.append((key, parts))
        elif stage == "quantize" and len(parts) == 3 and parts[2] == "result.json":
            quantize_keys[parts[0]] = key

    arditi = {spec.trait_name(t) for t in spec.traits if t.methodology == "arditi"}

    async def extraction(key: str, variant: str, trait: str, mode: str) -> Extraction:
        summary = ExtractSummary.model_validate(await reader.json(key))
        vectors: dict[str, VectorSet] = {}
        for method, vkey in sorted(summary.vector_keys.items()):
            vectors[method] = VectorSet.from_safetensors(await reader.bytes(vkey))
        ex = Extraction(variant, trait, mode, summary, key, vectors, dict(summary.vector_keys))
        if (
            trait in arditi
            and mode == "native"
            and summary.activations_key
            and summary.activations_key in present
        ):
            keep = _activation_layers(spec, summary.layers, ex.num_layers)
            ex.activations = await _load_activations(reader, summary.activations_key, keep)
        return ex

    loaded = await asyncio.gather(*(extraction(*args) for args in summary_keys))
    extractions = {(e.variant, e.trait, e.mode): e for e in loaded}

    # -- steerer results ---------------------------------------------------------------------
    refused: list[str] = []

    async def guarded(coro: Awaitable[_V]) -> _V | None:
        try:
            return await coro
        except FailedPrecondition as err:
            refused.append(str(err))
            return None

    async def steer(key: str, parts: list[str]) -> SteerView:
        method, _, vmode = parts[5].rpartition("-")
        mode, _, sign = parts[6].rpartition("-")
        view = parse_steer(
            await reader.json(key),
            key=key,
            target=parts[0],
            source=parts[4],
            trait=f"{parts[2]}/{parts[3]}",
            method=method,
            vector_mode=vmode,
            mode=mode,
            direction="+" if sign == "pos" else "-",
        )
        # Per-question scores of the best run and of the baseline, for paired intervals.
        if view.best_run_index is not None and view.runs_key in present:
            for row in await reader.jsonl(view.runs_key):
                if isinstance(row, Mapping) and row.get("run_index") == view.best_run_index:
                    view.best_per_question = per_question_scores(row.get("answers") or [])
                    view.per_question_keys.append(view.runs_key)
                    break
        if view.baseline_key and view.baseline_key in present:
            view.baseline_per_question = per_question_scores(await reader.jsonl(view.baseline_key))
            view.per_question_keys.append(view.baseline_key)
        return view

    async def logit_diff(key: str, parts: list[str]) -> LogitDiffView:
        method, _, vmode = parts[5].rpartition("-")
        return parse_logit_diff(
            await reader.json(key),
            key=key,
            variant=parts[0],
            source=parts[4],
            trait=f"{parts[2]}/{parts[3]}",
            method=method,
            vector_mode=vmode,
        )

    async def benchmark(key: str, parts: list[str]) -> BenchmarkView:
        return parse_benchmark(await reader.json(key), key=key, variant=parts[0], name=parts[2])

    async def probe(key: str, parts: list[str]) -> ProbeView:
        return parse_probe(await reader.json(key), key=key, variant=parts[0], name=parts[2])

    steer_views = _present(await asyncio.gather(*(guarded(steer(k, p)) for k, p in steer_keys)))
    ld_views = _present(await asyncio.gather(*(guarded(logit_diff(k, p)) for k, p in ld_keys)))
    bench_views = _present(await asyncio.gather(*(guarded(benchmark(k, p)) for k, p in bench_keys)))
    probe_views = _present(await asyncio.gather(*(guarded(probe(k, p)) for k, p in probe_keys)))
    for reason in sorted(refused):
        notes.append(f"Not read: {reason}.")

    # -- what is missing, and why --------------------------------------------------------------
    missing: dict[str, list[str]] = {}
    for stage, expected in _expected(spec, run_id).items():
        if stage == "probe":
            gone = [k for k in expected if not any(p.startswith(k) for p in present)]
        else:
            gone = [k for k in expected if k not in present]
        gone = [
            k
            for k in gone
            if _parse_key(prefix, k) is None or k[len(prefix) :].split("/")[0] in variant_ids
        ]
        if gone:
            missing[stage] = gone
    if not spec.steering.enabled:
        notes.append("Steering is disabled in the spec (steering.enabled: false).")
    if not spec.logit_diff.enabled:
        notes.append("Logit difference is disabled in the spec (logit_diff.enabled: false).")
    elif not any(t.methodology == "caa" for t in spec.traits):
        notes.append("No CAA trait in the spec: no logit-difference results.")
    if not spec.benchmarks:
        notes.append("No capability benchmarks in the spec.")
    if not spec.probes.enabled:
        notes.append("Safety probes are disabled in the spec (probes.enabled: false).")
    if not spec.extraction.store_activations:
        notes.append(
            "Activations were not stored (extraction.store_activations: false): no safety-neuron "
            "analysis."
        )
    for stage, gone in missing.items():
        notes.append(
            f"{len(gone)} expected {stage} result(s) are not in the bucket (failed, cancelled or "
            "still running); the tables leave those cells out."
        )
    loader_notes: dict[str, list[str]] = {}
    for ex in extractions.values():
        for note in ex.summary.loader.get("notes") or []:
            bucket = loader_notes.setdefault(ex.variant, [])
            if str(note) not in bucket:
                bucket.append(str(note))
    quantization = await _quantization(reader, planned, extractions, quantize_keys)
    return RunArtefacts(
        run_id=run_id,
        spec=spec,
        variants=planned,
        extractions=extractions,
        steer=sorted(steer_views, key=lambda v: v.key),
        logit_diff=sorted(ld_views, key=lambda v: v.key),
        benchmarks=sorted(bench_views, key=lambda v: v.key),
        probes=sorted(probe_views, key=lambda v: v.key),
        inputs=dict(sorted(reader.inputs.items())),
        missing=missing,
        notes=notes,
        loader_notes=loader_notes,
        quantization=quantization,
    )


async def _quantization(
    reader: _Reader,
    planned: Sequence[PlannedVariant],
    extractions: Mapping[tuple[str, str, str], Extraction],
    result_keys: Mapping[str, str],
) -> dict[str, QuantizeView]:
    """A :class:`QuantizeView` per gptq/awq variant: its quantize result and its loader's Info."""
    out: dict[str, QuantizeView] = {}
    for v in planned:
        if v.precision.value not in ("gptq", "awq"):
            continue
        key = result_keys.get(v.id)
        raw = await reader.json(key) if key else None
        # Any extraction of the variant: one loader served them all (first by key, stable).
        summaries = sorted(
            (ex.summary_key, ex.summary.loader) for ex in extractions.values() if ex.variant == v.id
        )
        loader_key, loader = summaries[0] if summaries else (None, None)
        out[v.id] = parse_quantize(
            raw if isinstance(raw, Mapping) else None,
            loader,
            variant=v.id,
            key=key,
            loader_source=loader_key,
        )
    return out
