"""The experiment spec: one YAML file describing the whole study matrix.

Validated by pydantic with unknown keys forbidden; ``load_spec`` turns any validation error into
``InvalidArgument`` whose field is the dotted path of the offending key
(``steering.search.steps``). The spec's hash keys the run; the planner turns it into jobs.

Bad input is refused here with a named error rather than later in a worker: files over
``MAX_SPEC_BYTES``, text that is not UTF-8, YAML nested deeper than ``MAX_DEPTH`` or with a key
given twice, non-finite numbers, ``true`` where a number is wanted, duplicated list entries,
names that cannot be key parts, and layers outside a model whose layer count is known here.

A package: limits and field types (``fields``), the sections' models (``sections``), the
whole study (``experiment``), parsing (``parsing``) and data locations (``locations``); every
name is re-exported here, so ``from services.common.spec import X`` is the way to import.
"""

from services.common.spec.experiment import ExperimentSpec, known_layer_count
from services.common.spec.fields import (
    DEFAULT_POSITIONS,
    MAX_DEPTH,
    MAX_LAYER,
    MAX_SEED,
    MAX_SPEC_BYTES,
    METHODS,
    Layer,
    Seed,
    UniqueLayers,
)
from services.common.spec.locations import check_portable, data_locations, model_locations
from services.common.spec.parsing import load_spec, parse_spec, spec_from_bytes
from services.common.spec.sections import (
    BUILTIN_BENCHMARKS,
    AnalysisSpec,
    BenchmarkFormat,
    BenchmarkSpec,
    ExtractionSpec,
    ImportedVectorsSpec,
    JudgeSpec,
    LogitDiffSpec,
    ModelSpec,
    NoiseSpec,
    ProbeSpec,
    SearchSpec,
    SteeringSpec,
    TraitRef,
    VettingSpec,
)

__all__ = [
    "BUILTIN_BENCHMARKS",
    "DEFAULT_POSITIONS",
    "MAX_DEPTH",
    "MAX_LAYER",
    "MAX_SEED",
    "MAX_SPEC_BYTES",
    "METHODS",
    "AnalysisSpec",
    "BenchmarkFormat",
    "BenchmarkSpec",
    "ExperimentSpec",
    "ExtractionSpec",
    "ImportedVectorsSpec",
    "JudgeSpec",
    "Layer",
    "LogitDiffSpec",
    "ModelSpec",
    "NoiseSpec",
    "ProbeSpec",
    "SearchSpec",
    "Seed",
    "SteeringSpec",
    "TraitRef",
    "UniqueLayers",
    "VettingSpec",
    "check_portable",
    "data_locations",
    "known_layer_count",
    "load_spec",
    "model_locations",
    "parse_spec",
    "spec_from_bytes",
]
