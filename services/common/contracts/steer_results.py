"""The steerer's result documents as written to S3 (schemas documented in docs/ARTEFACTS.md).

* ``SteerResult`` -> ``.../steer/.../result.json`` (runs without answers), ``SteerRun`` rows
  (with answers) -> ``.../steer/.../runs.jsonl``, ``BaselineRow`` -> ``.../baseline/.../answers.jsonl``;
* ``LogitDiffResult`` -> ``.../logit_diff/.../result.json``;
* ``BenchmarkResult`` -> ``.../benchmark/<name>/result.json``;
* ``ProbeResult`` -> ``.../probe/<name>/result.json``.

Every document carries ``schema_version``; the analyzer refuses versions it does not know.
Judge-derived numbers always say which backend, judge model and rubric hash produced them;
unscorable answers are counted and left out of means, never scored as 0.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.contracts.common import Interval, Slope

__all__ = [
    "Answer",
    "BaselineRow",
    "BaselineSummary",
    "BenchmarkItem",
    "BenchmarkResult",
    "BestRun",
    "Budget",
    "CallCounts",
    "HeldOutScore",
    "JudgeProvenance",
    "LogitDiffCoefficient",
    "LogitDiffItemResult",
    "LogitDiffResult",
    "NoiseComponent",
    "NoiseFloor",
    "ProbeItem",
    "ProbeResult",
    "QuestionSet",
    "RefusalTemplates",
    "RunStats",
    "SteerResult",
    "SteerRun",
    "Verdict",
]

STEER_SCHEMA: Final = "qsens.steer/1"
LOGIT_DIFF_SCHEMA: Final = "qsens.logit_diff/1"
BENCHMARK_SCHEMA: Final = "qsens.benchmark/1"
PROBE_SCHEMA: Final = "qsens.probe/1"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- steering -------------------------------------------------------------------------------


class Verdict(_Doc):
    """The judge's verdict on one answer (trimmed ``JudgeResult``)."""

    score: float | None = Field(description="0-100 when scored.")
    status: Literal["scored", "refusal", "unscorable"]
    reason: str | None = Field(None, description="Why unscorable.")
    used: float | None = Field(
        description="The value that entered the mean: the score, 100 for a refusal on a refusal "
        "trait, None when left out (unscorable, or a refusal on any other trait)."
    )


class Answer(_Doc):
    """One steered (or unsteered) answer with its two verdicts."""

    index: int = Field(description="Index of the question in the job's question set.")
    question: str
    answer: str
    finish_reason: str
    trait: Verdict
    coherence: Verdict


class RunStats(_Doc):
    """Means over the scored answers of one setting, and what was left out."""

    mean_trait: float | None
    mean_coherence: float | None
    n: int = Field(description="Answers (questions).")
    n_trait_scored: int = Field(description="Answers whose trait verdict entered the mean.")
    n_coherence_scored: int
    n_refusal: int = Field(description="Trait verdicts that were REFUSAL.")
    n_unscorable_trait: int
    n_unscorable_coherence: int


class SteerRun(RunStats):
    """One evaluated setting. In ``result.json`` ``answers`` is empty; ``runs.jsonl`` has them."""

    run_index: int
    phase: Literal["coarse", "fine", "select", "ablate"]
    step: int = Field(description="Search step (one loader batch) that evaluated it.")
    layer: int | None = Field(description="Steered layer (None: ablation at every layer).")
    layers: list[int] = Field(description="Layers the intervention touched.")
    vector_layer: int = Field(description="Layer of the source vector used.")
    coefficient: float = Field(description="In units of the vector's own norm (1 for ablation).")
    question_set: str = Field(description="Which question set: eval, harmful_val, harmful_test.")
    added_norm: float | None = Field(description="||coefficient * v|| (add mode).")
    relative_norm: float | None = Field(
        description="added_norm over the source's mean activation norm at that layer."
    )
    coherent: bool = Field(description="Mean coherence >= the threshold.")
    eligible: bool = Field(description="Enough trait verdicts to compete for best.")
    answers: list[Answer] = Field(default_factory=list)


class BaselineRow(Answer):
    """One row of ``baseline/.../answers.jsonl``."""

    set_id: str
    judge_backend: str
    judge_model: str
    trait_rubric_hash: str
    coherence_rubric_hash: str


class QuestionSet(_Doc):
    """The prompts a steer job evaluates."""

    kind: Literal["eval", "harmful_test", "harmful_val"] = Field(
        description="The trait's open steering questions, or Arditi harmful instructions."
    )
    set_id: str = Field(description="Hash-keyed id of questions + generation + judge settings.")
    count: int
    questions: list[str]


class BaselineSummary(RunStats):
    """The unsteered answers the deltas are measured against."""

    key: str
    set_id: str
    reused: bool = Field(description="Read from an earlier job instead of generated here.")
    trait_ci: Interval


class BestRun(_Doc):
    """The best coherent run with its delta vs the baseline (paired over questions)."""

    run_index: int
    phase: str
    layer: int | None
    layers: list[int]
    vector_layer: int
    coefficient: float
    added_norm: float | None
    relative_norm: float | None
    mean_trait: float
    mean_coherence: float
    n: int
    trait_ci: Interval = Field(description="Bootstrap over questions of the run's mean trait.")
    delta: float | None = Field(description="Mean paired (steered - baseline) trait score.")
    delta_ci: Interval = Field(description="Bootstrap over questions of the paired delta.")


class HeldOutScore(_Doc):
    """The chosen setting scored again on questions the search never saw (winner's curse)."""

    kind: Literal["held_out"] = "held_out"
    questions: list[str]
    n: int
    mean_trait: float | None
    mean_coherence: float | None
    baseline_trait: float | None = Field(description="Unsteered mean on the same questions.")
    delta: float | None = Field(description="Mean paired (steered - baseline) trait score.")
    delta_ci: Interval | None
    trait_values: list[float | None] = Field(description="Steered trait score per question.")
    baseline_values: list[float | None] = Field(description="Unsteered score per question.")


class NoiseComponent(_Doc):
    """One source of noise: the chosen setting's steering effect under each replicate."""

    source: Literal["questions", "seeds", "rejudge"]
    description: str
    effects: list[float | None] = Field(
        description="Signed (steered - unsteered) mean trait score per replicate."
    )
    sd: float | None = Field(
        description="Sample SD of the replicates' effects (None: not counted in the band)."
    )
    note: str | None = Field(None, description="Why the component is not counted, if so.")


class NoiseFloor(_Doc):
    """How much the chosen setting's effect moves when nothing about the model changes.

    ``band`` = 1.96 * sqrt(2) * sd with ``sd`` the root sum of squares of the components' SDs:
    two variants' effects, each that noisy, differ by less than ``band`` 95% of the time."""

    n: int = Field(description="Questions per replicate.")
    repeats: int
    temperature: float = Field(description="Sampling temperature of the seed replicates.")
    components: list[NoiseComponent]
    sd: float | None
    band: float | None = Field(description="Effects closer than this are not a difference.")


class JudgeProvenance(_Doc):
    """Which judge produced the scores."""

    backend: str
    model: str
    trait_rubric_hash: str
    coherence_rubric_hash: str


class Budget(_Doc):
    """How many settings each cell (layer) used."""

    mode: Literal["adaptive", "equal", "single"]
    budget_per_cell: int | None = Field(description="Runs every cell spends in equal mode.")
    runs_per_cell: dict[str, int] = Field(description="layer -> settings evaluated.")
    total_runs: int


class CallCounts(_Doc):
    """Work sent to the loader and the judge."""

    loader_calls: int = Field(description="Generate / Score / NextToken requests.")
    loader_rows: int = Field(description="Rows (items) in them.")
    judge_calls: int = Field(description="JudgeClient.score calls (each may be chunked).")
    judge_items: int = Field(description="Items judged (trait and coherence count apart).")


class SteerResult(_Doc):
    """``result.json`` of one steer job."""

    schema_version: Literal["qsens.steer/1"] = STEER_SCHEMA
    run_id: str
    target: str
    source: str
    cross_precision: bool = Field(description="Vectors come from another variant.")
    trait: str
    methodology: str
    method: str
    vector_mode: str
    mode: Literal["add", "ablate"]
    direction: Literal["+", "-"]
    objective: Literal["max", "min"] = Field(description="max: steer towards; min: away.")
    coherence_threshold: float
    questions: QuestionSet
    generation: dict[str, Any]
    search: dict[str, Any] = Field(description="The SearchSpec used.")
    budget: Budget
    layers: list[int] = Field(description="Candidate layers searched.")
    skipped_layers: dict[str, str] = Field(description="layer -> why it was not searched.")
    vector: dict[str, Any] = Field(description="Source keys, norms and activation norms.")
    judge: JudgeProvenance
    baseline: BaselineSummary
    runs: list[SteerRun]
    best: BestRun | None
    best_per_layer: dict[str, BestRun]
    status: Literal["ok", "no_coherent_run"]
    brackets: dict[str, list[float | None]] = Field(
        default_factory=dict,
        description="layer -> [largest coherent, smallest incoherent] coarse coefficient.",
    )
    bootstrap: dict[str, Any]
    loader: dict[str, Any]
    calls: CallCounts
    seconds: float
    held_out: HeldOutScore | None = Field(
        None, description="The best setting re-scored on held-out questions (add mode)."
    )
    noise: NoiseFloor | None = Field(
        None, description="The noise floor (the reference's own add-mode jobs)."
    )


# -- logit difference -----------------------------------------------------------------------


class LogitDiffItemResult(_Doc):
    """One A/B question across the coefficient sweep."""

    item_id: str
    matching: str
    not_matching: str
    values: list[float] = Field(description="logit(matching) - logit(not matching) per coef.")
    p_matching: list[float] = Field(
        description="p(matching) / (p(matching) + p(not matching)) per coefficient."
    )
    slope: float | None = Field(description="This question's least-squares slope.")


class LogitDiffCoefficient(_Doc):
    """Aggregates at one coefficient."""

    multiple: float = Field(description="Multiple of the unit coefficient.")
    coefficient: float = Field(description="In units of the vector's norm.")
    mean: Interval
    frac_positive: float = Field(description="Share of questions preferring the matching letter.")
    mean_p_matching: float


class LogitDiffResult(_Doc):
    """``result.json`` of one logit_diff job."""

    schema_version: Literal["qsens.logit_diff/1"] = LOGIT_DIFF_SCHEMA
    run_id: str
    variant: str
    source: str
    trait: str
    method: str
    vector_mode: str
    layer: int
    vector_norm: float
    activation_norm: float
    unit_coefficient: float = Field(
        description="activation_norm / vector_norm: multiple 1 adds a vector as long as a "
        "typical activation."
    )
    multiples: list[float]
    coefficients: list[float]
    letter_tokens: list[str] = Field(description="Token strings compared (e.g. 'A', 'B').")
    prompt_suffix: str = Field(description="Assistant prefix before the letter, e.g. '('.")
    unsteered: Interval = Field(description="Mean logit difference without steering.")
    per_coefficient: list[LogitDiffCoefficient]
    slope: Slope = Field(description="Steerability: d(mean logit diff) / d(multiple).")
    items: list[LogitDiffItemResult]
    n: int
    loader: dict[str, Any]
    calls: CallCounts
    seconds: float


# -- benchmarks -----------------------------------------------------------------------------


class BenchmarkItem(_Doc):
    """One question: every choice's log-likelihood and the predictions."""

    id: str
    gold: list[int] = Field(description="Index of the correct choice (MC1 for TruthfulQA).")
    candidates: list[int] | None = Field(
        None, description="Choices competing for the prediction (TruthfulQA: the MC1 ones)."
    )
    mc2_true: list[int] = Field(default_factory=list, description="TruthfulQA: true MC2 choices.")
    logprobs: list[float]
    num_tokens: list[int]
    num_chars: list[int]
    pred: int = Field(description="argmax of logprob / num_chars (length-normalised).")
    pred_raw: int = Field(description="argmax of the raw logprob.")
    correct: bool = Field(description="pred is gold (MC1 target for TruthfulQA).")
    correct_raw: bool
    mc2: float | None = Field(None, description="TruthfulQA MC2: normalised mass on true answers.")


class BenchmarkResult(_Doc):
    """``result.json`` of one benchmark job."""

    schema_version: Literal["qsens.benchmark/1"] = BENCHMARK_SCHEMA
    run_id: str
    variant: str
    name: str
    format: str
    path: str
    file_sha256: str
    n_total: int = Field(description="Items in the file.")
    n: int = Field(description="Items scored (after limit).")
    limit: int | None
    seed: int
    metric: str = Field(description="What 'accuracy' is: acc_norm (chars), or mc1 for TruthfulQA.")
    accuracy: Interval = Field(description="Length-normalised accuracy with a Wilson interval.")
    accuracy_bootstrap: Interval
    accuracy_raw: Interval = Field(description="Unnormalised log-likelihood accuracy (Wilson).")
    mc2: Interval | None = Field(None, description="TruthfulQA MC2 (bootstrap over questions).")
    prompt_format: str = Field(description="How contexts and continuations were built.")
    items: list[BenchmarkItem]
    loader: dict[str, Any]
    calls: CallCounts
    seconds: float


# -- safety probes --------------------------------------------------------------------------


class ProbeItem(_Doc):
    """One harmful prompt."""

    index: int
    prompt: str
    entropy: float = Field(description="First-token entropy (nats).")
    top1: float = Field(description="Probability of the most likely first token.")
    top5: float = Field(description="Probability mass of the five most likely first tokens.")
    gini: float
    logit_range: float = Field(description="Max minus min first-token logit.")
    top_tokens: list[str]
    p_refusal_start: float = Field(
        description="Mass of the top first tokens that open a refusal (the calibration proxy)."
    )
    answer: str
    refused: bool
    prefix: str = Field(description="First words of the answer (normalised), for templates.")


class RefusalTemplates(_Doc):
    """How stereotyped the refusals are."""

    n_refusals: int
    prefix_words: int
    distinct_prefixes: int
    diversity: float | None = Field(description="distinct prefixes / refusals (1 = all differ).")
    entropy_bits: float | None = Field(description="Entropy of the prefix distribution.")
    top_prefix: str | None
    top_prefix_share: float | None = Field(description="Share of refusals with the top prefix.")


class ProbeResult(_Doc):
    """``result.json`` of one probe job."""

    schema_version: Literal["qsens.probe/1"] = PROBE_SCHEMA
    run_id: str
    variant: str
    name: str
    harmful: str = Field(description="Trait whose harmful instructions were used.")
    splits: list[str]
    n: int
    max_new_tokens: int
    entropy: Interval
    top1: Interval
    top5: Interval
    gini: Interval
    logit_range: Interval
    refusal_rate: Interval = Field(description="Wilson interval.")
    calibration: dict[str, Any] = Field(
        description="Proxy calibration of p_refusal_start against the observed refusals: "
        "ece (10 equal-width bins), brier, mean_confidence, bins."
    )
    templates: RefusalTemplates
    refusal_markers: list[str] = Field(description="Substrings that mark a refusal.")
    items: list[ProbeItem]
    loader: dict[str, Any]
    calls: CallCounts
    seconds: float
