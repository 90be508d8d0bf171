"""The spec's sections: one pydantic model per part of the study (models, traits, judge,
extraction, steering, logit difference, benchmarks, probes, analysis, imported vectors)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    field_validator,
    model_serializer,
    model_validator,
)

from services.common.errors import InvalidArgument
from services.common.judging import JudgeChoice
from services.common.precisions import precision_info
from services.common.quantization import QuantizeSpec
from services.common.spec.fields import (
    _POSITION,
    Seed,
    UniqueLayers,
    _check_name,
    _no_duplicates,
    _Strict,
)
from services.common.variants import Precision

__all__ = [
    "BUILTIN_BENCHMARKS",
    "AnalysisSpec",
    "BenchmarkFormat",
    "BenchmarkSpec",
    "ExtractionSpec",
    "ImportedVectorsSpec",
    "JudgeSpec",
    "LogitDiffSpec",
    "ModelSpec",
    "NoiseSpec",
    "ProbeSpec",
    "SearchSpec",
    "SteeringSpec",
    "TraitRef",
    "VettingSpec",
]


class ModelSpec(_Strict):
    """One model of the study."""

    name: str = Field(description="Short name used in variant ids, e.g. smollm2-135m.")
    source: str = Field(description="Hub id, folder, .gguf file, smollm2-135m or tiny:llama.")
    family: str = Field("", description="Model family for the robustness ranking (llama, qwen...).")
    size_b: float = Field(0.0, ge=0, description="Parameters in billions (for the size ranking).")
    backend: str | None = Field(None, description="Force a backend (default: the precision's).")
    device: str = Field("auto", description="Device for its loaders.")
    precisions: Annotated[list[Precision], AfterValidator(_no_duplicates)] | None = Field(
        None, min_length=1, description="Precisions for this model only (default: the spec's)."
    )
    checkpoints: dict[Precision, str] = Field(
        default_factory=dict,
        description="Published gptq/awq checkpoint per precision (hub id or folder): served "
        "as is, no quantize job. A gptq/awq precision without one is quantized by the platform.",
    )
    quantize: QuantizeSpec | None = Field(
        None, description="Platform quantization settings for this model (default: the spec's)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.strip().startswith("tiny:"):
            from services.loader.tiny import parse_tiny

            try:
                parse_tiny(value.strip())
            except InvalidArgument as err:
                option = err.field.removeprefix("model").lstrip(".")
                where = f"tiny option {option}: " if option else ""
                raise ValueError(f"{where}{err.message}") from None
        return value

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, value: dict[Precision, str]) -> dict[Precision, str]:
        for precision in value:
            if not precision_info(precision).platform_quantized:
                raise ValueError(f"only gptq and awq take a checkpoint, not {precision.value}")
        return value


class TraitRef(_Strict):
    """A trait: a built-in name (``pv/evil``) or ``<methodology>:<path>`` with a name."""

    ref: str = Field(description="Built-in name or methodology:path.")
    name: str | None = Field(None, description="Override the trait name used in keys.")
    position: str | None = Field(None, description="Override the methodology's default position.")

    @field_validator("position")
    @classmethod
    def _position(cls, value: str | None) -> str | None:
        if value is not None and not _POSITION.match(value.replace(" ", "")):
            raise ValueError(
                "bad position; expected prompt[-1], prompt[:], response[:], response[:k] "
                "(k >= 1), response[-1] or all"
            )
        return value

    @property
    def methodology(self) -> str:
        head = self.ref.split(":", 1)[0] if ":" in self.ref else self.ref.split("/", 1)[0]
        return head


class JudgeSpec(_Strict, JudgeChoice):
    """Which judge scores trait expression and coherence (``services.common.judging``)."""

    coherence_threshold: float = Field(70.0, ge=0, le=100, description="Minimum mean coherence.")


class VettingSpec(_Strict):
    """Drop contrast responses that do not show the intended behaviour (pv)."""

    enabled: bool = Field(True, description="Vet generated responses with the judge.")
    positive_min: float = Field(
        50.0, ge=0, le=100, description="Keep positives scoring at least this."
    )
    negative_max: float = Field(
        50.0, ge=0, le=100, description="Keep negatives scoring at most this."
    )
    min_keep: int = Field(
        4, ge=1, le=100_000, description="Fail the job if fewer pairs survive per class."
    )


class ExtractionSpec(_Strict):
    """How contrast sets are built, generated, vetted and captured."""

    n_train: int | None = Field(None, ge=1, description="Training items per class (None: all).")
    n_val: int = Field(8, ge=0, description="Held-out items per class for AUROC.")
    rollouts: int = Field(1, ge=1, le=20, description="Responses per pv question and instruction.")
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Tokens per generated response.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature for responses.")
    seed: Seed = Field(0, description="Split and sampling seed.")
    replay: Literal["off", "on", "both", "2x2"] = Field(
        "on",
        description="Controlled extraction: non-reference variants replay the reference's responses "
        "(on), generate their own (off), or both; 2x2: both, and the reference also reads each "
        "variant's own responses (text changed vs model changed).",
    )
    vetting: VettingSpec = Field(default_factory=VettingSpec)
    store_activations: bool = Field(
        True, description="Keep captured activations (analysis needs them)."
    )


class SearchSpec(_Strict):
    """Adaptive coefficient search per layer, then a fine sweep around the best."""

    init_fraction: float = Field(
        0.2, gt=0, description="First ||coef*v|| as a fraction of the typical activation norm."
    )
    steps: int = Field(4, ge=1, le=50, description="Coarse settings per layer.")
    probes: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Coarse coefficients per layer per step, all in one loader/judge batch: 1 is the "
            "classic sequential walk; k > 1 searches k points at once ((k+1)-ary bisection), "
            "so the same settings take ceil(steps / k) sequential rounds."
        ),
    )
    scale_up: float = Field(
        1.6, gt=1, description="Multiply the coefficient while coherence holds."
    )
    scale_down: float = Field(0.6, gt=0, lt=1, description="Multiply when coherence breaks.")
    fine_points: int = Field(6, ge=0, le=64, description="Coefficients in the fine sweep.")
    fine_width: float = Field(0.3, ge=0, le=1, description="Fine sweep spans best*(1 +- width).")
    budget: Literal["adaptive", "equal"] = Field(
        "equal", description="equal: every cell spends exactly budget_runs settings."
    )
    budget_runs: int | None = Field(
        None, ge=1, le=10_000, description="Runs per cell in equal mode."
    )


class NoiseSpec(_Strict):
    """The noise floor: the reference variant's chosen setting evaluated again (issue 17).

    Three sources of spread, each ``repeats`` times: other samples of the trait's steering
    questions, other sampling seeds (at ``temperature``) on the held-out questions, and the
    judge scoring the same answers again. The band derived from them is the distance inside
    which two precisions' steering effects are not told apart."""

    enabled: bool = Field(
        True, description="Measure the noise floor on the reference's own add-mode steer jobs."
    )
    repeats: int = Field(3, ge=2, le=50, description="Replicates per source of noise.")
    temperature: float = Field(
        0.7, gt=0, le=2, description="Sampling temperature of the seed replicates."
    )
    rejudge: bool = Field(True, description="Also judge the same answers again.")


class SteeringSpec(_Strict):
    """Steering evaluation."""

    enabled: bool = Field(True, description="Run steering jobs.")
    traits: Annotated[list[str], AfterValidator(_no_duplicates)] | None = Field(
        None, description="Trait names to steer (default: all)."
    )
    methods: (
        Annotated[list[Literal["mean_diff", "probe", "pca"]], AfterValidator(_no_duplicates)] | None
    ) = Field(None, description="Vector methods to steer with (default: the first method).")
    layers: UniqueLayers | None = Field(
        None, description="Candidate layers (default: evenly spaced)."
    )
    n_layers: int = Field(
        6, ge=1, le=128, description="Evenly spaced candidate layers if none given."
    )
    layer_range: tuple[float, float] = Field((0.2, 0.8), description="Depth range for candidates.")
    # The seeds judged 20 questions per cell; every built-in trait holds 40 (20 + 20).
    questions: int | None = Field(
        20, ge=1, description="Steering questions the search picks the best setting on."
    )
    held_out: int = Field(
        20,
        ge=0,
        le=1000,
        description="Further questions of the trait (after the search's) on which the chosen "
        "setting is scored again (winner's curse); 0: none. Cross-precision comparisons use "
        "this score when every variant has it.",
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="Tokens per steered answer.")
    directions: Annotated[list[Literal["+", "-"]], AfterValidator(_no_duplicates)] = Field(
        ["+"], min_length=1, description="Steer towards (+) or away (-)."
    )
    cross_precision: bool | Literal["both"] = Field(
        True,
        description="Also steer each variant with reference vectors; both: and the reference "
        "with each variant's vectors.",
    )
    ablation: bool = Field(
        True, description="Directional ablation at all layers for refusal traits."
    )
    search: SearchSpec = Field(default_factory=SearchSpec)
    noise: NoiseSpec = Field(default_factory=NoiseSpec)
    bootstrap: int = Field(1000, ge=100, le=100000, description="Bootstrap resamples for CIs.")
    seed: Seed = Field(0, description="Sampling and bootstrap seed.")


class LogitDiffSpec(_Strict):
    """CAA A/B logit difference under steering."""

    enabled: bool = Field(True, description="Run logit-difference jobs for caa traits.")
    coefficients: Annotated[list[Annotated[float, Strict()]], AfterValidator(_no_duplicates)] = (
        Field(
            [-2.0, -1.0, 0.0, 1.0, 2.0],
            min_length=1,
            description="Multiples of the typical-norm unit coefficient.",
        )
    )
    layer_fraction: float = Field(0.5, ge=0, le=1, description="Layer (as depth) to steer at.")
    limit: int | None = Field(50, ge=1, description="A/B items (None: all).")
    cross_precision: bool | Literal["both"] = Field(
        False,
        description="Also run each variant with the reference's vectors; both: and the "
        "reference with each variant's vectors.",
    )

    @model_serializer(mode="wrap")
    def _omit_no_cross(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Specs (and logit_diff jobs) without it dump and hash as before it existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("cross_precision") is False:
            data.pop("cross_precision", None)
        return data


BenchmarkFormat = Literal["hellaswag", "mmlu", "truthfulqa_mc", "arc", "caa_ab"]

#: Built-in benchmarks, package data of ``services.extractor.datasets`` (so baked into the worker
#: image): name -> (format, file below that package's folder). Their provenance and licence lie
#: beside the files.
BUILTIN_BENCHMARKS: dict[str, tuple[BenchmarkFormat, str]] = {
    "mmlu_ab": ("caa_ab", "published/caa/mmlu_ab.json"),
    "truthfulqa_ab": ("caa_ab", "published/caa/truthfulqa_ab.json"),
}


class BenchmarkSpec(_Strict):
    """One capability benchmark: a built-in (``mmlu_ab``) or a data file in a given format.

    In a spec, a bare string is a built-in's name; an object without ``path`` runs the built-in
    ``builtin`` (default: ``name``) labelled ``name``; an object with ``path`` reads that file.
    After validation a built-in has ``builtin`` and ``format`` set and no ``path``."""

    name: str = Field(description="Label in results (e.g. mmlu_ab).")
    builtin: str | None = Field(
        None, description="Built-in benchmark to run (default: name, when no path is given)."
    )
    format: BenchmarkFormat | None = Field(
        None, description="File format reader (required with a path; a built-in's own otherwise)."
    )
    path: str | None = Field(
        None,
        description="Data file: a local path (laptop) or s3://bucket/key (cluster); none for a "
        "built-in.",
    )
    limit: int | None = Field(None, ge=1, description="Deterministic subset size.")
    seed: Seed = Field(0, description="Subset seed.")

    @model_validator(mode="before")
    @classmethod
    def _builtin(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or value.get("path") is not None:
            return value
        if set(value) - set(cls.model_fields):
            return value  # an unknown key is the first thing to report
        # A built-in: which one, and its format (errors name the key: "builtin: ...").
        given = value.get("builtin")
        wanted = given if given is not None else value.get("name")
        if not isinstance(wanted, str):
            return value  # the field validators report the missing or mistyped name
        if wanted not in BUILTIN_BENCHMARKS:
            raise ValueError(
                f"{'builtin' if given is not None else 'name'}: unknown built-in benchmark "
                f"{wanted!r}; built-in: {', '.join(BUILTIN_BENCHMARKS)}; or give format and "
                "path (a local file, or s3://bucket/key on a cluster)"
            )
        fmt = BUILTIN_BENCHMARKS[wanted][0]
        if value.get("format") not in (None, fmt):
            raise ValueError(f"format: the built-in {wanted} is {fmt}, not {value['format']}")
        return {**value, "builtin": wanted, "format": fmt}

    @model_validator(mode="after")
    def _file(self) -> BenchmarkSpec:
        if self.path is not None:
            if self.builtin is not None:
                raise ValueError("builtin: give either a built-in or a path, not both")
            if self.format is None:
                raise ValueError(
                    "format: required with a path (hellaswag, mmlu, truthfulqa_mc, arc, caa_ab)"
                )
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @property
    def location(self) -> str:
        """Where the data is: ``builtin:<name>``, a local path or an ``s3://`` URI."""
        return f"builtin:{self.builtin}" if self.path is None else self.path

    @property
    def file_format(self) -> BenchmarkFormat:
        """The reader's format (always set once validated)."""
        if self.format is None:  # unreachable after validation; kept for the type checker
            raise InvalidArgument("format", f"benchmark {self.name} has no format")
        return self.format


class ProbeSpec(_Strict):
    """Safety probes on harmful prompts."""

    enabled: bool = Field(True, description="Run safety probes.")
    harmful: str = Field("arditi/refusal", description="Trait whose harmful prompts to use.")
    limit: int = Field(32, ge=1, description="Harmful prompts.")
    max_new_tokens: int = Field(32, ge=1, le=512, description="Tokens per generated answer.")


class AnalysisSpec(_Strict):
    """Analyzer settings."""

    enabled: bool = Field(True, description="Run the analyze job at the end of the run.")
    layer_range: tuple[float, float] = Field((0.2, 0.8), description="Depth range for mean cosine.")
    refusal_depth: float = Field(0.65, ge=0, le=1, description="Depth of the refusal direction.")


class ImportedVectorsSpec(_Strict):
    """A vector set made elsewhere (``qsens vectors import``), steered like an extracted one."""

    name: str = Field(description="Names its steering results (source imported-<name>).")
    location: str = Field(
        description="s3://bucket/key (cluster) or a local path: a qsens vector set, a repeng "
        ".gguf, a persona-vectors .pt or plain safetensors."
    )
    model: str = Field(description="The spec model whose variants it steers.")
    trait: str = Field(description="The spec trait it expresses (questions, judge rubric).")
    steer: bool = Field(True, description="Steer every variant of the model with it.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)
