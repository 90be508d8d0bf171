"""The experiment spec: one YAML file describing the whole study matrix.

Validated by pydantic with unknown keys forbidden; ``load_spec`` turns any validation error into
``InvalidArgument`` whose field is the dotted path of the offending key
(``steering.search.steps``). The spec's hash keys the run; the planner turns it into jobs.

Bad input is refused here with a named error rather than later in a worker: files over
``MAX_SPEC_BYTES``, text that is not UTF-8, YAML nested deeper than ``MAX_DEPTH`` or with a key
given twice, non-finite numbers, ``true`` where a number is wanted, duplicated list entries,
names that cannot be key parts, and layers outside a model whose layer count is known here.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from services.common.errors import InvalidArgument
from services.common.hashing import stable_hash
from services.common.judging import JudgeChoice
from services.common.methodologies import METHODOLOGIES
from services.common.precisions import precision_info
from services.common.quantization import BUILTIN_CALIBRATION, QuantizeSpec
from services.common.variants import Precision

__all__ = [
    "BUILTIN_BENCHMARKS",
    "MAX_DEPTH",
    "MAX_SPEC_BYTES",
    "BenchmarkFormat",
    "BenchmarkSpec",
    "ExperimentSpec",
    "ExtractionSpec",
    "JudgeSpec",
    "LogitDiffSpec",
    "ModelSpec",
    "ProbeSpec",
    "SearchSpec",
    "SteeringSpec",
    "TraitRef",
    "check_portable",
    "data_locations",
    "known_layer_count",
    "load_spec",
    "model_locations",
    "parse_spec",
    "spec_from_bytes",
]

METHODS = ("mean_diff", "probe", "pca")
DEFAULT_POSITIONS: dict[str, str] = {m: f.default_position for m, f in METHODOLOGIES.items()}
_POSITION = re.compile(
    r"^(all|prompt\[-1\]|prompt\[:\]|response\[:\]|response\[:[1-9]\d{0,5}\]|response\[-1\])$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SUBKEY = re.compile(r"^[a-z_]+: ")

#: A spec names its data (trait, benchmark, calibration files); it never holds it, so anything
#: larger is a mistake, and every job record (the analyze job carries the whole spec) must fit
#: in one NATS message.
MAX_SPEC_BYTES = 256 * 1024
#: Deepest YAML nesting a spec may have (a real one is under 10 levels).
MAX_DEPTH = 64
#: Layer indices beyond this are refused even when the model's layer count is not known here.
MAX_LAYER = 4096
#: Seeds feed numpy, torch and the loader's uint64 sampling seed.
MAX_SEED = 2**63 - 1

_T = TypeVar("_T")


def _check_name(value: str) -> str:
    if not _NAME.match(value) or ".." in value:
        raise ValueError("letters, digits, '.', '_' or '-' (at most 64), no '..'")
    return value


def _no_duplicates(values: list[_T]) -> list[_T]:
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        key = json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else v
        if key in seen:
            shown = getattr(v, "value", v)
            raise ValueError(f"{shown} is listed twice (items {seen[key]} and {i})")
        seen[key] = i
    return values


# Strict: lax mode would read `true` as layer 1 (and then report a duplicate, not the bool).
Layer = Annotated[int, Strict(), Field(ge=-MAX_LAYER, lt=MAX_LAYER)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
UniqueLayers = Annotated[list[Layer], AfterValidator(_no_duplicates)]


class _Strict(BaseModel):
    # allow_inf_nan: NaN and infinities in coefficients or search settings only fail later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    replay: Literal["off", "on", "both"] = Field(
        "on",
        description="Controlled extraction: non-reference variants replay the reference's responses "
        "(on), generate their own (off), or both.",
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
    questions: int | None = Field(10, ge=1, description="Steering questions per trait (None: all).")
    max_new_tokens: int = Field(48, ge=1, le=1024, description="Tokens per steered answer.")
    directions: Annotated[list[Literal["+", "-"]], AfterValidator(_no_duplicates)] = Field(
        ["+"], min_length=1, description="Steer towards (+) or away (-)."
    )
    cross_precision: bool = Field(
        True, description="Also steer each variant with reference vectors."
    )
    ablation: bool = Field(
        True, description="Directional ablation at all layers for refusal traits."
    )
    search: SearchSpec = Field(default_factory=SearchSpec)
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


def _check_vectors(spec: ExperimentSpec, trait_names: list[str]) -> None:
    _first_repeat([v.name for v in spec.vectors], "vectors[{}].name", "names must be unique")
    models = [m.name for m in spec.models]
    for i, v in enumerate(spec.vectors):
        if v.model not in models:
            raise ValueError(f"vectors[{i}].model: unknown model {v.model!r} (spec has {models})")
        if v.trait not in trait_names:
            raise ValueError(f"vectors[{i}].trait: unknown trait {v.trait!r} ({trait_names})")


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


class ExperimentSpec(_Strict):
    """The whole study."""

    name: str = Field(description="Run name prefix.")
    description: str = Field("", max_length=65536, description="Free text for the report.")
    models: list[ModelSpec] = Field(min_length=1, max_length=64, description="Models of the study.")
    precisions: Annotated[list[Precision], AfterValidator(_no_duplicates)] = Field(
        min_length=1, description="Precisions of every model."
    )
    reference: Precision = Field(Precision.BF16, description="Reference precision for comparisons.")
    traits: list[TraitRef] = Field(min_length=1, max_length=256, description="Traits to extract.")
    methods: Annotated[
        list[Literal["mean_diff", "probe", "pca"]], AfterValidator(_no_duplicates)
    ] = Field(["mean_diff", "probe"], min_length=1, description="Extraction methods.")
    layers: UniqueLayers | None = Field(None, description="Layers to capture (None: all).")
    extraction: ExtractionSpec = Field(default_factory=ExtractionSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    steering: SteeringSpec = Field(default_factory=SteeringSpec)
    logit_diff: LogitDiffSpec = Field(default_factory=LogitDiffSpec)
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list, max_length=64)
    probes: ProbeSpec = Field(default_factory=ProbeSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    quantize: QuantizeSpec = Field(
        default_factory=QuantizeSpec,
        description="How the platform quantizes gptq/awq variants without a published checkpoint.",
    )
    vectors: list[ImportedVectorsSpec] = Field(
        default_factory=list, max_length=256, description="Imported vector sets to steer with."
    )

    @model_serializer(mode="wrap")
    def _omit_no_vectors(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A spec without imported vectors dumps (and hashes: job ids) as before they existed.
        data = handler(self)
        if isinstance(data, dict) and not data.get("vectors"):
            data.pop("vectors", None)
        return data

    @field_validator("traits", mode="before")
    @classmethod
    def _traits(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"ref": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        _first_repeat(
            [b.name for b in self.benchmarks],
            "benchmarks[{}].name",
            "benchmark names must be unique (results are keyed by name)",
        )
        _first_repeat(
            [m.name for m in self.models], "models[{}].name", "model names must be unique"
        )
        for m in self.models:
            if self.reference not in self.precisions_for(m):
                raise ValueError(
                    f"reference: {self.reference.value} is not among the precisions of {m.name}"
                )
        trait_names = [self.trait_name(t) for t in self.traits]
        for i, (trait, name) in enumerate(zip(self.traits, trait_names, strict=True)):
            _check_trait_name(name, f"traits[{i}].{'name' if trait.name else 'ref'}")
        _first_repeat(trait_names, "traits[{}]", "trait names must be unique")
        if self.steering.traits:
            for t in self.steering.traits:
                if t not in trait_names:
                    raise ValueError(
                        f"steering.traits: unknown trait {t!r} (spec has {trait_names})"
                    )
        if self.steering.methods:
            for method in self.steering.methods:
                if method not in self.methods:
                    raise ValueError(
                        f"steering.methods: {method} is not extracted (methods: {self.methods})"
                    )
        _check_layers(self)
        _check_vectors(self, trait_names)
        return self

    def precisions_for(self, model: ModelSpec) -> list[Precision]:
        return list(model.precisions or self.precisions)

    @staticmethod
    def trait_name(trait: TraitRef) -> str:
        if trait.name:
            return trait.name
        if ":" in trait.ref:
            method, path = trait.ref.split(":", 1)
            return f"{method}/{Path(path).stem if Path(path).suffix else Path(path).name}"
        return trait.ref

    def position_for(self, trait: TraitRef) -> str:
        return (trait.position or DEFAULT_POSITIONS.get(trait.methodology, "prompt[-1]")).replace(
            " ", ""
        )

    def fingerprint(self) -> str:
        return stable_hash(self.model_dump(mode="json"), 12)


def _first_repeat(values: Sequence[str], field: str, message: str) -> None:
    """ValueError naming the second of two equal ``values`` (``field`` formats its index)."""
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ValueError(f"{field.format(i)}: {message} ({value!r} is used twice)")
        seen.add(value)


def _check_trait_name(name: str, field: str) -> None:
    """A trait name is ``<methodology>/<name>``: two key parts (results live under both)."""
    parts = name.split("/")
    if len(parts) != 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
        raise ValueError(
            f"{field}: trait names look like <methodology>/<name> (e.g. pv/evil), each part "
            f"letters, digits, '.', '_' or '-' without '..', got {name!r}"
        )


def known_layer_count(source: str) -> int | None:
    """Decoder layers of a model source when known without loading it: ``tiny:`` options, the
    built-in SmolLM2-135M, or a local folder's ``config.json``; None otherwise (hub ids)."""
    from services.loader.model_source import SMOLLM2_ALIASES
    from services.loader.tiny import parse_tiny

    text = source.strip()
    if text.startswith("tiny:"):
        return parse_tiny(text)[1]["layers"]
    if text.lower() in SMOLLM2_ALIASES:
        return 30  # SmolLM2-135M-Instruct
    config = Path(text).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None  # the loader reports an unreadable folder with its own error
    n = raw.get("num_hidden_layers") if isinstance(raw, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _check_layers(spec: ExperimentSpec) -> None:
    """Every listed layer exists in every model whose layer count is known, once."""
    for model in spec.models:
        n = known_layer_count(model.source)
        if n is None:
            continue
        for field, layers in (("layers", spec.layers), ("steering.layers", spec.steering.layers)):
            resolved: dict[int, int] = {}  # layer index in [0, n) -> the value first listed
            for j, layer in enumerate(layers or ()):
                if not -n <= layer < n:
                    raise ValueError(
                        f"{field}[{j}]: layer {layer} is out of range for model {model.name}, "
                        f"which has {n} layers (0..{n - 1}, or -{n}..-1 from the end)"
                    )
                if layer % n in resolved:
                    raise ValueError(
                        f"{field}[{j}]: layer {layer} is layer {resolved[layer % n]} "
                        f"again for model {model.name} ({n} layers)"
                    )
                resolved[layer % n] = layer


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "spec"


# pydantic error types that, on a bool input, mean a number was wanted.
_NUMBER_ERRORS = frozenset(
    {
        "int_type",
        "float_type",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)


def _bool_as_number(raw: Any, validated: Any, path: tuple[int | str, ...] = ()) -> None:
    """InvalidArgument where the input had ``true``/``false`` and the spec kept a number.

    pydantic's lax mode turns ``true`` into 1 for int and float fields; walking the input beside
    the validated dump finds every such place, in nested settings too, without a strict type on
    each field (strict mode would also refuse the strings that name enums)."""
    stack = [(raw, validated, path)]
    while stack:
        r, v, p = stack.pop()
        if isinstance(r, bool):
            if not isinstance(v, bool):
                raise InvalidArgument(_loc(p), f"expected a number, got {str(r).lower()}")
        elif isinstance(r, dict) and isinstance(v, dict):
            stack.extend((r[k], v[k], (*p, k)) for k in r if isinstance(k, str) and k in v)
        elif isinstance(r, list) and isinstance(v, list | tuple) and len(r) == len(v):
            stack.extend((a, b, (*p, i)) for i, (a, b) in enumerate(zip(r, v, strict=True)))


def parse_spec(data: Any, source: str = "spec") -> ExperimentSpec:
    """Validate a parsed spec; InvalidArgument names the first bad key."""
    if not isinstance(data, dict):
        raise InvalidArgument(source, "the spec must be a mapping")
    try:
        spec = ExperimentSpec.model_validate(data)
    except RecursionError:
        raise InvalidArgument(source, f"nested deeper than {MAX_DEPTH} levels") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _loc(tuple(p for p in first["loc"] if p not in ("function-after",)))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] in _NUMBER_ERRORS and isinstance(first.get("input"), bool):
            message = f"expected a number, got {str(first['input']).lower()}"
        if ": " in message and loc == "spec":
            loc, message = message.split(": ", 1)
        elif first["type"] == "value_error" and _SUBKEY.match(message):
            # A nested model's own check names its key first ("builtin: ...").
            key, message = message.split(": ", 1)
            loc = f"{loc}.{key}"
        raise InvalidArgument(loc, message) from None
    _bool_as_number(data, spec.model_dump(mode="python"))
    return spec


# libyaml when present: the pure-Python scanner takes seconds over a 256 KiB spec, and its
# composer recurses once per level (RecursionError on deep input); libyaml bounds nesting
# at 1000 levels itself. Either way _check_tree bounds it at MAX_DEPTH.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_tree(root: yaml.Node) -> None:
    """InvalidArgument for nesting deeper than ``MAX_DEPTH`` or a key given twice in one
    mapping (dotted path and both lines; YAML would silently keep the last)."""
    stack: list[tuple[yaml.Node, tuple[int | str, ...]]] = [(root, ())]
    seen_nodes: set[int] = set()  # aliases share nodes: each is walked once
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if len(path) > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise InvalidArgument("spec", f"nested deeper than {MAX_DEPTH} levels (line {line})")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(
                    key_node, yaml.ScalarNode
                ):
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        raise InvalidArgument(
                            _loc((*path, key)),
                            f"duplicate key (lines {lines[key]} and {line}); YAML would keep "
                            "only the last",
                        )
                    lines[key] = line
                stack.append((value_node, (*path, key)))


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _decode(data: bytes, source: str) -> str:
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise InvalidArgument("spec", f"{source} is {name} text; save it as UTF-8")
    if b"\x00" in data:
        raise InvalidArgument(
            "spec",
            f"{source} has NUL bytes (UTF-16 or UTF-32 text, or not text); save it as UTF-8",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "spec",
            f"{source} is not UTF-8 text (byte {exc.start} is {data[exc.start : exc.start + 1]!r});"
            " save it as UTF-8",
        ) from None


def spec_from_bytes(data: bytes, source: str = "spec") -> ExperimentSpec:
    """Decode, parse and validate a YAML (or JSON) spec; every refusal is an InvalidArgument."""
    if len(data) > MAX_SPEC_BYTES:
        raise InvalidArgument(
            "spec",
            f"{source} is {len(data)} bytes, over the {MAX_SPEC_BYTES // 1024} KiB a spec may "
            "have; a spec names its data (trait, benchmark and calibration files) rather than "
            "holding it",
        )
    text = _decode(data, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_tree(node)
        tree = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1000 levels)
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise InvalidArgument("spec", f"nested deeper than {MAX_DEPTH} levels{where}") from None
        raise InvalidArgument("spec", f"{source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidArgument("spec", f"{source} is nested too deeply") from None
    finally:
        loader.dispose()
    return parse_spec(tree, source)


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec file (see :func:`spec_from_bytes`)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            # One byte over the bound is enough to refuse, whatever the file's size.
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument("spec", f"cannot read {p}: {exc.strerror}") from None
    return spec_from_bytes(data, str(p))


def _is_remote(location: str) -> bool:
    return location.strip().lower().startswith("s3://")


def data_locations(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """``(field, location)`` of every data file or folder the spec names by path (built-ins,
    which every worker image holds, are not listed)."""
    out: list[tuple[str, str]] = []
    for i, trait in enumerate(spec.traits):
        _, sep, location = trait.ref.partition(":")
        if sep:
            out.append((f"traits[{i}].ref", location))
    _, sep, location = spec.probes.harmful.partition(":")
    if sep:
        out.append(("probes.harmful", location))
    for i, bench in enumerate(spec.benchmarks):
        if bench.path is not None:
            out.append((f"benchmarks[{i}].path", bench.path))
    out += [(f"vectors[{i}].location", v.location) for i, v in enumerate(spec.vectors)]
    return out + _calibration_locations(spec)


def _calibration_locations(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """The calibration sets of the quantize jobs the spec plans (a gptq/awq precision without a
    published checkpoint), unless built in; the spec's own set is listed once."""
    out: list[tuple[str, str]] = []
    for i, model in enumerate(spec.models):
        quantized = [
            p
            for p in spec.precisions_for(model)
            if precision_info(p).platform_quantized and p not in model.checkpoints
        ]
        settings = model.quantize or spec.quantize
        field = f"models[{i}].quantize" if model.quantize else "quantize"
        entry = (f"{field}.calibration.source", settings.calibration.source)
        if quantized and entry[1] != BUILTIN_CALIBRATION and entry not in out:
            out.append(entry)
    return out


# A Hugging Face hub id: exactly one '/', between an owner and a name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _local_model(source: str) -> bool:
    """Whether a model source is a path on this machine: a folder or a .gguf file, rather than
    a built-in model (smollm2-135m, tiny:...), a hub id or an s3:// key."""
    from services.loader.model_source import SMOLLM2_ALIASES

    text = source.strip()
    if _is_remote(text) or text.startswith("tiny:") or text.lower() in SMOLLM2_ALIASES:
        return False
    if text.startswith("gguf:") or text.lower().endswith(".gguf"):
        return True
    # A folder here of a hub id's name is what a loader on this machine would load.
    return not _HUB_ID.match(text) or Path(text).expanduser().is_dir()


def model_locations(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """``(field, location)`` of every model source or published checkpoint the spec names by a
    path on this machine (see ``_local_model``)."""
    out: list[tuple[str, str]] = []
    for i, model in enumerate(spec.models):
        if _local_model(model.source):
            out.append((f"models[{i}].source", model.source))
        for precision, checkpoint in model.checkpoints.items():
            if _local_model(checkpoint):
                out.append((f"models[{i}].checkpoints.{precision.value}", checkpoint))
    return out


def check_portable(spec: ExperimentSpec) -> None:
    """Refuse local paths in a spec bound for a cluster, whose loaders and workers cannot read
    them: models must be built in, on the hub or in S3, data built in or under an s3:// key."""
    for field, location in model_locations(spec):
        wanted = (
            "a published checkpoint's hub id (org/name) or s3:// folder (`qsens models put "
            "FOLDER`), or none to let the platform quantize"
            if ".checkpoints." in field
            else "a hub id (org/name), an s3:// folder (`qsens models put FOLDER` uploads one) "
            "or a built-in model (smollm2-135m, tiny:...)"
        )
        raise InvalidArgument(
            field,
            f"{location} is a local path; on a cluster the loaders cannot read this machine's "
            f"files, so name {wanted}",
        )
    for field, location in data_locations(spec):
        if not _is_remote(location):
            raise InvalidArgument(
                field,
                f"{location} is a local path; on a cluster the path must be an s3:// key; "
                f"upload it with `qsens data put FILE`",
            )
