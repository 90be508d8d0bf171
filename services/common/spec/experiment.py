"""The whole study (``ExperimentSpec``) and the checks that span its sections: unique names,
known traits and methods, layers within each model whose layer count is known here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from services.common.hashing import stable_hash
from services.common.methodologies import methodology_info, position_reads_response
from services.common.quantization import QuantizeSpec
from services.common.spec.fields import (
    DEFAULT_POSITIONS,
    UniqueLayers,
    _check_name,
    _check_trait_name,
    _first_repeat,
    _no_duplicates,
    _Strict,
)
from services.common.spec.sections import (
    AnalysisSpec,
    BenchmarkSpec,
    ExtractionSpec,
    ImportedVectorsSpec,
    JudgeSpec,
    LogitDiffSpec,
    ModelSpec,
    ProbeSpec,
    SteeringSpec,
    TraitRef,
)
from services.common.variants import Precision

__all__ = ["ExperimentSpec", "known_layer_count"]


def _check_vectors(spec: ExperimentSpec, trait_names: list[str]) -> None:
    _first_repeat([v.name for v in spec.vectors], "vectors[{}].name", "names must be unique")
    models = [m.name for m in spec.models]
    for i, v in enumerate(spec.vectors):
        if v.model not in models:
            raise ValueError(f"vectors[{i}].model: unknown model {v.model!r} (spec has {models})")
        if v.trait not in trait_names:
            raise ValueError(f"vectors[{i}].trait: unknown trait {v.trait!r} ({trait_names})")


def _check_both_directions(spec: ExperimentSpec) -> None:
    """Refuse a 2x2 replay or a cross-precision comparison the spec cannot produce."""
    compared = any(len(spec.precisions_for(m)) > 1 for m in spec.models)
    if spec.extraction.replay == "2x2":
        if not compared:
            raise ValueError(
                "extraction.replay: 2x2 needs a model with a precision besides the reference"
            )
        if not any(position_reads_response(spec.position_for(t)) for t in spec.traits):
            raise ValueError(
                "extraction.replay: 2x2 needs a trait read at response positions "
                "(text is replayed only there)"
            )
    if spec.steering.cross_precision == "both" and not (spec.steering.enabled and compared):
        raise ValueError(
            "steering.cross_precision: both needs steering.enabled and a model with "
            "a precision besides the reference"
        )
    if spec.logit_diff.cross_precision is not False:
        if not (spec.logit_diff.enabled and compared):
            raise ValueError(
                "logit_diff.cross_precision: needs logit_diff.enabled and a model "
                "with a precision besides the reference"
            )
        if not any(methodology_info(t.methodology).logit_diff for t in spec.traits):
            raise ValueError(
                "logit_diff.cross_precision: needs a trait whose methodology has "
                "a logit difference (caa)"
            )


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
        _check_both_directions(self)
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
