"""The ``extract`` stage's contract: the job's params, ``summary.json`` and the job's result.

The params' nested settings are the experiment spec's own models (``ExtractionSpec``,
``JudgeSpec``), so a job is checked by the same rules as the spec it came from, and the
planner's JSON of them is exactly the spec section's (job ids do not change).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.contracts.common import Params, TraitParams, VectorMode
from services.common.spec import ExtractionSpec, JudgeSpec

__all__ = [
    "ExtractOutcome",
    "ExtractParams",
    "ExtractSummary",
    "VettingSummary",
    "extraction_key",
]


class ExtractParams(Params):
    """The params of an ``extract`` job (built by the planner)."""

    variant: str
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="The model's spec entry (context for the job id; the loader serves it).",
    )
    precision: str = ""
    trait: TraitParams
    mode: VectorMode = "native"
    replay_from: str | None = None
    position: str
    layers: list[int] | None = None
    methods: list[str] = Field(default_factory=lambda: ["mean_diff", "probe"])
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)

    @model_validator(mode="after")
    def _reverse_names_its_text(self) -> ExtractParams:
        if self.mode == "reverse" and not self.replay_from:
            raise ValueError("replay_from: reverse mode reads another variant's responses; name it")
        return self


def extraction_key(run_id: str, params: ExtractParams, *leaf: str) -> str:
    """An extraction's artefact key. A reverse extraction (the reference on ``replay_from``'s
    text) sits one folder deeper, under the variant whose text it read: one per variant."""
    from services.common.artefacts import extract_key  # artefacts imports this module

    mode_parts = (params.replay_from or "",) if params.mode == "reverse" else ()
    return extract_key(run_id, params.variant, params.trait.name, params.mode, *mode_parts, *leaf)


class ExtractOutcome(BaseModel):
    """What an extract job returns for its record (the full story is ``summary.json``)."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    trait: str
    mode: VectorMode
    already_done: bool = False
    n_train_pos: int | None = None
    n_train_neg: int | None = None
    auroc_mid: dict[str, float | None] = Field(default_factory=dict)
    seconds: float | None = None


class VettingSummary(BaseModel):
    """What vetting kept and dropped (pv traits with a judge)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool
    judge_backend: str = ""
    judge_model: str = ""
    rubric_hash: str = ""
    positive_min: float = 50.0
    negative_max: float = 50.0
    kept_pos: int = 0
    kept_neg: int = 0
    dropped_pos: int = 0
    dropped_neg: int = 0
    unscorable: int = 0
    # Judgments the judge's refusal-over-score setting decided (REFUSAL mass above a numeric
    # mass that alone would score: services.judge.aggregate).
    refusal_over_score: int = 0
    refusal_rate_pos: float = 0.0
    refusal_rate_neg: float = 0.0
    mean_score_pos: float | None = None
    mean_score_neg: float | None = None


class ExtractSummary(BaseModel):
    """``summary.json`` of one extraction (variant x trait x mode)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    variant: str
    model: str
    precision: str
    trait: str
    methodology: str
    mode: VectorMode
    replay_from: str | None = None
    position: str
    layers: list[int]
    methods: list[str]
    n_train_pos: int
    n_train_neg: int
    n_val_pos: int
    n_val_neg: int
    activation_norm: list[float] = Field(
        description="Mean L2 norm of the captured activations per layer."
    )
    vector_keys: dict[str, str] = Field(description="method -> safetensors key")
    activations_key: str | None = None
    responses_key: str | None = None
    vetting: VettingSummary
    auroc: dict[str, list[float | None]] = Field(default_factory=dict)
    norms: dict[str, list[float]] = Field(default_factory=dict)
    loader: dict[str, Any] = Field(
        default_factory=dict, description="Loader Info at extraction time."
    )
    generation: dict[str, Any] = Field(default_factory=dict)
    dataset_fingerprint: str = ""
    seconds: float = 0.0
