"""The analysis documents as typed models: what each ``analysis/*.json`` holds at its top level.

Builders return these (validated on construction, ``extra="forbid"``), the report's sections
render them, and :meth:`AnalysisDocument.to_json` is what the analyze job writes. Rows of the
tables (``entries``, ``pairs``, ``probes`` ...) are typed too, and so are their
classifications and the steering rows' best run; their other nested cells (intervals,
tests, comparisons) are JSON objects documented beside their builders and in
docs/ARTEFACTS.md (``## analyzer``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = [
    "SCHEMA",
    "AcrossVariants",
    "AnalysisDocument",
    "BenchmarkComparison",
    "BenchmarkEntry",
    "Bootstrap",
    "ClassificationCell",
    "FamilyRank",
    "LogitDiffBothEntry",
    "LogitDiffComparison",
    "LogitDiffEntry",
    "ModelRank",
    "PrecisionGroup",
    "PrecisionRank",
    "ProbeEntry",
    "ProbeStatistics",
    "RankedRow",
    "RefusalDirectionRow",
    "Replay2x2Entry",
    "RobustnessRanking",
    "Row",
    "SafetyNeuronRow",
    "SteeringBest",
    "SteeringBothEntry",
    "SteeringComparison",
    "SteeringEntry",
    "TwoByTwo",
    "VectorComparison",
    "VectorEntry",
    "VectorPair",
    "VectorWindow",
]

SCHEMA: Literal["qsens.analysis/1"] = "qsens.analysis/1"

Row = dict[str, Any]
"""One row of a document's table (a cell of the study matrix, with its ``sources``)."""


class Bootstrap(BaseModel):
    """Resampling settings a document's intervals used (``steering.bootstrap``/``seed``)."""

    model_config = ConfigDict(extra="forbid")

    resamples: int = Field(ge=0)
    seed: int


class AnalysisDocument(BaseModel):
    """What every analysis document carries."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["qsens.analysis/1"] = Field(SCHEMA, alias="schema")
    kind: str
    run_id: str
    reference_precision: str

    def to_json(self) -> dict[str, Any]:
        """The document as written to ``analysis/<kind>.json`` (before float cleaning)."""
        return self.model_dump(by_alias=True)


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SparseRow(_Row):
    """A row whose optional fields are written only when the builder set them (a reference
    row has no comparison), so the JSON has exactly the keys the builder gave."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        keep: set[str] = set()
        for name, f in type(self).model_fields.items():
            if f.is_required() or name in self.model_fields_set:
                keep |= {name, f.alias or name}  # dumped by name or, by_alias, by alias
        return {k: v for k, v in out.items() if k in keep}


class ClassificationCell(_SparseRow):
    """A cell's class (``services.analyzer.classify.Classification.to_json``): the metric value
    it rests on and, with an interval, the interval's classes and whether they agree."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    metric: str
    value: float | None
    class_: Literal["robust", "degraded", "broken", "n/a"] = Field(alias="class")
    ci: list[float] | None = None
    ci_classes: list[str] | None = None
    settled: bool | None = None
    reason: str | None = None
    noise_band: float | None = None
    within_noise: bool | None = None


class SteeringBest(_Row):
    """The best run of a steer result: its trait score with the bootstrap interval, where
    (layer, relative depth) and how hard (coefficient, added norm) it steered, and its
    coherence."""

    score: float | None
    low: float | None
    high: float | None
    layer: int | None
    depth: float | None
    coefficient: float | None
    added_norm: float | None
    coherence: float | None


class SteeringEntry(_SparseRow):
    """One steer result against the reference's own steering."""

    model: str
    trait: str
    method: str
    vector_mode: str
    mode: str
    direction: str
    target: str
    precision: str
    source: str
    steering: str = Field(description="self or reference_vectors.")
    is_reference: bool
    objective: str
    status: str
    question_set: str
    best: SteeringBest
    baseline: dict[str, Any]
    delta: dict[str, Any]
    effect: float | None
    budget: dict[str, Any]
    runs: int
    n_questions: int | None
    judge: dict[str, Any]
    bootstrap: dict[str, Any]
    sources: dict[str, Any]
    classification: ClassificationCell | None
    degradation_pct: dict[str, Any] | None = None
    shift: dict[str, Any] | None = None
    coherence_at_matched_coefficient: dict[str, Any] | None = None
    held_out: dict[str, Any] | None = Field(
        None, description="The best setting re-scored on held-out questions."
    )
    noise: dict[str, Any] | None = Field(None, description="The reference's noise floor.")


class LogitDiffEntry(_SparseRow):
    """One logit-difference result, with its comparison to the reference."""

    model: str
    trait: str
    method: str
    vector_mode: str
    variant: str
    precision: str
    is_reference: bool
    layer: int | None
    multiples: list[float]
    coefficients: list[float]
    mean: list[float | None]
    slope: dict[str, Any]
    unsteered: float | None
    n_questions: int
    sources: dict[str, Any]
    classification: ClassificationCell | None = None
    comparison: dict[str, Any] | None = None


class BenchmarkEntry(_SparseRow):
    """One benchmark result, with its change against the reference."""

    model: str
    benchmark: str
    variant: str
    precision: str
    is_reference: bool
    accuracy: dict[str, Any]
    sources: dict[str, Any]
    delta_pp: dict[str, Any] | None = None
    drop_pp: float | None = None
    mcnemar: dict[str, Any] | None = None
    classification: ClassificationCell | None = None


class PairOf(_Row):
    """A value of the reference and of the variant."""

    reference: Any
    variant: Any


class VectorWindow(_Row):
    """Means over the captured layers in ``analysis.layer_range``."""

    layers: list[int]
    n_layers_with_cosine: int
    mean_cosine: float | None
    min_cosine: float | None
    mean_norm_ratio: float | None
    mean_massive_dim_energy: PairOf
    mean_auroc: PairOf


class VectorCell(_Row):
    """Which vectors a row compares (model x trait x method x position)."""

    model: str
    trait: str
    methodology: str
    method: str
    position: str
    reference: str
    num_layers: int
    layers: list[int]
    cosine: list[float | None]
    norm_ratio: list[float | None]
    sources: dict[str, str]


class VectorEntry(VectorCell):
    """A variant's vectors against its reference's, per layer, classified on the window."""

    variant: str
    precision: str
    mode: str
    primary: bool = Field(description="The vector mode the variant's steering used.")
    reference_norm: list[float | None]
    variant_norm: list[float | None]
    massive_dim_energy: PairOf
    massive_dims_shared: list[float | None]
    auroc: PairOf
    null_layers: list[Row]
    window: VectorWindow
    classification: ClassificationCell | None
    n_train: list[int]
    n_val: list[int]


class VectorPair(VectorCell):
    """Two non-reference variants (primary modes), unclassified."""

    a: str
    a_mode: str
    b: str
    b_mode: str
    mean_cosine: float | None
    mean_norm_ratio: float | None


class ProbeEntry(_SparseRow):
    """One safety-probe result; a variant's row carries its comparison with the reference."""

    model: str
    probe: str
    variant: str
    precision: str
    n: int
    aggregate: dict[str, Any]
    refusal_rate: dict[str, Any] = Field(description="value, low, high as reported.")
    calibration: dict[str, Any]
    prefix_diversity: float | None
    is_reference: bool
    sources: dict[str, str | None]
    comparison: dict[str, Any] | None = None


class RefusalDirectionRow(_SparseRow):
    """A variant's mean_diff refusal direction against the reference's at one layer."""

    model: str
    trait: str
    variant: str
    precision: str
    depth: float
    requested_layer: int
    layer: int
    cosine: Any
    norm_ratio: Any
    reference_norm: Any = None
    variant_norm: Any = None
    reason: str | None = Field(None, description="Why a value is missing.")
    classification: ClassificationCell
    sources: dict[str, str]


class SafetyNeuronRow(_SparseRow):
    """Activation error on safety neurons vs the other neurons (``safety_neurons.py``); a row
    without enough inputs has ``reason`` and no statistics."""

    model: str
    trait: str
    variant: str
    precision: str
    layers: list[int]
    top_fraction: float
    n: int
    reason: str | None = None
    alignment: dict[str, Any] | None = None
    neurons_per_layer: int | None = None
    hidden_size: int | None = None
    mean_error_safety: Any = None
    mean_error_other: Any = None
    ratio: dict[str, Any] | None = None
    relative_ratio: dict[str, Any] | None = None
    t_test: dict[str, Any] | None = None
    relative_t_test: dict[str, Any] | None = None
    mann_whitney: dict[str, Any] | None = None
    per_layer: list[dict[str, Any]] | None = None
    sources: dict[str, str]


class AcrossVariants(_Row):
    """A correlation across quantized variants (one point per variant)."""

    x: str
    y: str
    variants: list[str]
    pearson: dict[str, Any]
    spearman: dict[str, Any]


class PrecisionGroup(_Row):
    """A metric of 4-bit variants against 8-bit and wider ones."""

    metric: str
    groups: dict[str, int]
    mann_whitney: dict[str, Any]


class RankedRow(_Row):
    """A ranked row: bootstrap means over its conditions, rank by mean cosine."""

    mean_cosine: dict[str, Any]
    mean_degradation_pct: dict[str, Any]
    mean_drop_pp: dict[str, Any]
    rank: int | None


class PrecisionRank(RankedRow):
    precision: str
    bits: int


class ModelRank(RankedRow):
    model: str
    family: str | None
    size_b: float | None


class FamilyRank(RankedRow):
    family: str | None
    models: list[str]


class TwoByTwo(_Row):
    """One number in a 2x2: model (reference / variant) x input (the reference's / the
    variant's text or vectors), with its additive split: ``input_effect`` is the mean over the
    two models of the change when the input goes from the reference's to the variant's,
    ``model_effect`` likewise for the model; ``input_effect + model_effect = var_var - ref_ref``
    and ``interaction = var_var - var_ref - ref_var + ref_ref``. None where a cell is missing."""

    ref_ref: float | None
    ref_var: float | None = Field(description="Reference model, the variant's input.")
    var_ref: float | None = Field(description="Variant model, the reference's input.")
    var_var: float | None
    input_effect: float | None
    model_effect: float | None
    interaction: float | None


class Replay2x2Entry(_Row):
    """Cosine with the reference's own vector (reference model on reference text) of each cell
    of the 2x2 controlled replay (``extraction.replay: 2x2``), per layer and over the window."""

    model: str
    trait: str
    method: str
    position: str
    reference: str
    variant: str
    precision: str
    layers: list[int]
    per_layer: list[TwoByTwo]
    window_layers: list[int]
    window: TwoByTwo
    sources: dict[str, str]


class SteeringBothEntry(_Row):
    """Steering both ways for one variant: the 2x2 (model x vectors) of the steering effect and
    best score, and each cross direction's degradation against the reference's own steering."""

    model: str
    trait: str
    method: str
    mode: str
    direction: str
    reference: str
    variant: str
    precision: str
    effect: TwoByTwo
    best_score: TwoByTwo
    model_changed: dict[str, Any] | None = Field(
        description="Degradation % of the variant steered with the reference's vectors."
    )
    vectors_changed: dict[str, Any] | None = Field(
        description="Degradation % of the reference steered with the variant's vectors."
    )
    sources: dict[str, str | None]


class LogitDiffBothEntry(_Row):
    """CAA logit difference both ways for one variant: the 2x2 (model x vectors) of the slope,
    and each cross direction's correlation with the reference's own per-question values."""

    model: str
    trait: str
    method: str
    reference: str
    variant: str
    precision: str
    slope: TwoByTwo
    model_changed: dict[str, Any] | None = Field(
        description="r of the variant with the reference's vectors vs the reference's own."
    )
    vectors_changed: dict[str, Any] | None = Field(
        description="r of the reference with the variant's vectors vs the reference's own."
    )
    sources: dict[str, str | None]


class _BothDirections(AnalysisDocument):
    """A document with a both-directions list, written only when the run has such results
    (so runs without them keep their documents byte for byte)."""

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in ("replay_2x2", "both_directions"):
            if name in out and not out[name]:
                del out[name]
        return out


class VectorComparison(_BothDirections):
    """``vector_comparison.json``: per-layer cosines of every variant against its reference."""

    kind: Literal["vector_comparison"] = "vector_comparison"
    layer_range: list[float]
    threshold: dict[str, Any]
    entries: list[VectorEntry]
    pairs: list[VectorPair]
    missing: list[Row]
    extraction_refusals: list[Row] = Field(
        default_factory=list,
        description="Refusal rates of the adversarial prompts per native extraction.",
    )
    replay_2x2: list[Replay2x2Entry] = Field(default_factory=list)


class SteeringComparison(_BothDirections):
    """``steering_comparison.json``: best score, delta and degradation per steer result."""

    kind: Literal["steering_comparison"] = "steering_comparison"
    threshold: dict[str, Any]
    coherence_threshold: float
    judge: dict[str, Any]
    bootstrap: Bootstrap
    entries: list[SteeringEntry]
    spread: list[Row]
    both_directions: list[SteeringBothEntry] = Field(default_factory=list)


class LogitDiffComparison(_BothDirections):
    """``logit_diff_comparison.json``: CAA logit differences against the reference."""

    kind: Literal["logit_diff_comparison"] = "logit_diff_comparison"
    threshold: dict[str, Any]
    bootstrap: Bootstrap
    entries: list[LogitDiffEntry]
    both_directions: list[LogitDiffBothEntry] = Field(default_factory=list)


class BenchmarkComparison(AnalysisDocument):
    """``benchmark_comparison.json``: capability accuracy against the reference."""

    kind: Literal["benchmark_comparison"] = "benchmark_comparison"
    threshold: dict[str, Any]
    bootstrap: Bootstrap
    entries: list[BenchmarkEntry]


class ProbeStatistics(AnalysisDocument):
    """``probe_statistics.json``: safety probes, refusal direction, safety neurons."""

    kind: Literal["probe_statistics"] = "probe_statistics"
    refusal_depth: float
    safety_neurons: dict[str, Any]
    bootstrap: Bootstrap
    probes: list[ProbeEntry]
    refusal_direction: list[RefusalDirectionRow]
    safety_neuron_errors: list[SafetyNeuronRow]
    across_variants: list[AcrossVariants]
    precision_groups: list[PrecisionGroup]


class RobustnessRanking(AnalysisDocument):
    """``robustness_ranking.json``: methods, precisions, models and families ranked."""

    kind: Literal["robustness_ranking"] = "robustness_ranking"
    note: str
    method_comparison: dict[str, Any]
    precisions: list[PrecisionRank]
    models: list[ModelRank]
    families: list[FamilyRank]
    size: dict[str, Any]
