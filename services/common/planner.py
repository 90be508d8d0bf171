"""Turn an experiment spec into a run: the DAG of jobs every worker will execute.

extract (reference first when replaying) -> steer / logit_diff -> analyze, with benchmark and
probe jobs beside. A gptq/awq variant without a published checkpoint gets a quantize job first:
every job that talks to that variant's loader depends on it (the loader waits for the
checkpoint the job commits; see ``services.common.quantization``). Job params are the stage
contracts (``services.common.contracts``) in their JSON form: they carry everything a worker
needs (no worker reads the spec file), so a job is reproducible from its own JSON.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from services.common.contracts.analyze import AnalyzeParams
from services.common.contracts.common import TraitParams, VectorMode
from services.common.contracts.extract import ExtractParams
from services.common.contracts.steer import (
    BenchmarkParams,
    LogitDiffParams,
    ProbeParams,
    SteerParams,
)
from services.common.jobs import Job, JobKind, RunPlan, validate_run_id
from services.common.methodologies import methodology_info, position_reads_response
from services.common.precisions import precision_info
from services.common.quantization import QuantizeRequest
from services.common.resultkeys import check_result_keys
from services.common.spec import ExperimentSpec, ModelSpec, SteeringSpec, TraitRef
from services.common.variants import Precision

__all__ = [
    "PlannedVariant",
    "build_plan",
    "loader_source",
    "new_run_id",
    "quantize_request",
    "variants_of",
]


SteerMode = Literal["add", "ablate"]
Sign = Literal["+", "-"]


@dataclass(frozen=True)
class PlannedVariant:
    """A model at a precision, with what its loader needs."""

    model: ModelSpec
    precision: Precision

    @property
    def id(self) -> str:
        return f"{self.model.name}@{self.precision.value}"


def variants_of(spec: ExperimentSpec) -> list[PlannedVariant]:
    """Every (model, precision) of the spec, reference precision first per model."""
    out: list[PlannedVariant] = []
    for model in spec.models:
        precisions = spec.precisions_for(model)
        ordered = [spec.reference] + [p for p in precisions if p != spec.reference]
        out.extend(PlannedVariant(model, p) for p in ordered)
    return out


def quantize_request(
    spec: ExperimentSpec, model: ModelSpec, precision: Precision
) -> QuantizeRequest | None:
    """The platform quantization a variant needs: None unless gptq/awq without a checkpoint."""
    if not precision_info(precision).platform_quantized or precision in model.checkpoints:
        return None
    settings = model.quantize or spec.quantize
    return settings.request(model.name, model.source, precision.value)


def loader_source(model: ModelSpec, precision: Precision) -> str:
    """What a variant's loader loads: the published checkpoint if the spec names one."""
    return model.checkpoints.get(precision, model.source)


def new_run_id(spec: ExperimentSpec) -> str:
    """``<name>-<utc time>-<spec hash>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return validate_run_id(f"{spec.name[:36]}-{stamp}-{spec.fingerprint()[:6]}")


def _model_params(model: ModelSpec) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude={"precisions", "checkpoints", "quantize"})


def _trait_params(spec: ExperimentSpec, trait: TraitRef) -> TraitParams:
    return TraitParams(ref=trait.ref, name=spec.trait_name(trait), methodology=trait.methodology)


@dataclass
class _Builder:
    """The jobs of one plan as they are added, with the indexes later jobs depend on."""

    spec: ExperimentSpec
    run_id: str
    variants: list[PlannedVariant]
    jobs: list[Job] = field(default_factory=list)
    quantize: dict[str, Job] = field(default_factory=dict)
    # (variant, trait, vector mode) -> extract job
    extract: dict[tuple[str, str, str], Job] = field(default_factory=dict)

    def add(self, kind: JobKind, name: str, params: BaseModel, deps: tuple[str, ...] = ()) -> Job:
        """Append a job whose params are ``params``'s JSON form (what workers validate)."""
        job = Job(
            kind=kind,
            run_id=self.run_id,
            name=name,
            params=params.model_dump(mode="json"),
            deps=deps,
        )
        self.jobs.append(job)
        return job

    def after_quantize(self, variant: str) -> tuple[str, ...]:
        """Deps of a job that needs ``variant``'s loader: its quantize job, if any."""
        job = self.quantize.get(variant)
        return (job.id,) if job is not None else ()

    def vector_job(self, variant: str, trait: str) -> tuple[Job, VectorMode]:
        """The extraction whose vectors a variant uses: replay when it exists (controlled)."""
        modes: tuple[VectorMode, ...] = ("replay", "native")
        for mode in modes:
            job = self.extract.get((variant, trait, mode))
            if job is not None:
                return job, mode
        raise KeyError((variant, trait))

    def of_model(self, model: ModelSpec) -> list[PlannedVariant]:
        return [v for v in self.variants if v.model.name == model.name]


def _extract_modes(spec: ExperimentSpec, is_ref: bool, position: str) -> list[VectorMode]:
    """Native for the reference and prompt positions; otherwise as ``extraction.replay`` says
    (``2x2`` extracts what ``both`` does; ``_plan_reverse`` adds the reference's reverse jobs)."""
    if is_ref or not position_reads_response(position) or spec.extraction.replay == "off":
        return ["native"]
    if spec.extraction.replay == "on":
        return ["replay"]
    return ["native", "replay"]


def _plan_reverse(b: _Builder, model: ModelSpec, trait: TraitRef, ref_variant: str) -> None:
    """The 2x2's fourth cell: the reference model on each other variant's own responses, after
    that variant's native extraction (which wrote them)."""
    spec = b.spec
    name, position = spec.trait_name(trait), spec.position_for(trait)
    if spec.extraction.replay != "2x2" or not position_reads_response(position):
        return
    ref = next(v for v in b.of_model(model) if v.id == ref_variant)
    for v in b.of_model(model):
        if v.id == ref_variant:
            continue
        params = ExtractParams(
            variant=ref_variant,
            model=_model_params(ref.model),
            precision=ref.precision.value,
            trait=_trait_params(spec, trait),
            mode="reverse",
            replay_from=v.id,
            position=position,
            layers=spec.layers,
            methods=list(spec.methods),
            extraction=spec.extraction,
            judge=spec.judge,
        )
        b.add(
            JobKind.EXTRACT,
            f"extract {ref_variant} {name} reverse on {v.id}",
            params,
            (b.extract[(v.id, name, "native")].id, *b.after_quantize(ref_variant)),
        )


def _plan_quantize(b: _Builder) -> None:
    for v in b.variants:
        request = quantize_request(b.spec, v.model, v.precision)
        if request is not None:
            b.quantize[v.id] = b.add(JobKind.QUANTIZE, f"quantize {v.id}", request)


def _plan_extract(b: _Builder) -> None:
    spec = b.spec
    for model in spec.models:
        ref_variant = f"{model.name}@{spec.reference.value}"
        for trait in spec.traits:
            name = spec.trait_name(trait)
            position = spec.position_for(trait)
            for v in b.of_model(model):
                for mode in _extract_modes(spec, v.id == ref_variant, position):
                    replay = mode == "replay"
                    deps = (b.extract[(ref_variant, name, "native")].id,) if replay else ()
                    params = ExtractParams(
                        variant=v.id,
                        model=_model_params(v.model),
                        precision=v.precision.value,
                        trait=_trait_params(spec, trait),
                        mode=mode,
                        replay_from=ref_variant if replay else None,
                        position=position,
                        layers=spec.layers,
                        methods=list(spec.methods),
                        extraction=spec.extraction,
                        judge=spec.judge,
                    )
                    b.extract[(v.id, name, mode)] = b.add(
                        JobKind.EXTRACT,
                        f"extract {v.id} {name} {mode}",
                        params,
                        deps + b.after_quantize(v.id),
                    )
            _plan_reverse(b, model, trait, ref_variant)


def _steer_settings(steering: SteeringSpec, methodology: str) -> list[tuple[SteerMode, Sign]]:
    settings: list[tuple[SteerMode, Sign]] = [("add", d) for d in steering.directions]
    if steering.ablation and methodology_info(methodology).ablation:
        settings.append(("ablate", "-"))
    return settings


def _wants_noise(
    steering: SteeringSpec, target: str, source: str, reference: str, mode: SteerMode
) -> bool:
    """The noise floor is measured once per trait and method: on the reference's own vectors,
    add mode (ablation has no coefficient to pick), where held-out questions exist (its seed
    replicates run on them; the spec refuses an explicit request without them)."""
    wanted = steering.noise.enabled and steering.held_out > 0
    return wanted and target == source == reference and mode == "add"


def _cross_sources(
    cross: bool | Literal["both"], b: _Builder, v: PlannedVariant, ref_variant: str
) -> list[str]:
    """Whose vectors ``v`` is also run with: the reference's (``true``), and for the reference
    each other variant's of its model (``both``)."""
    if v.id != ref_variant:
        return [ref_variant] if cross else []
    if cross == "both":
        return [o.id for o in b.of_model(v.model) if o.id != ref_variant]
    return []


def _plan_steer(b: _Builder, methods: Sequence[str]) -> None:
    spec, steering = b.spec, b.spec.steering
    steer_traits = steering.traits or [spec.trait_name(t) for t in spec.traits]
    for model in spec.models:
        ref_variant = f"{model.name}@{spec.reference.value}"
        for trait in spec.traits:
            name = spec.trait_name(trait)
            if name not in steer_traits:
                continue
            for v in b.of_model(model):
                sources = [v.id, *_cross_sources(steering.cross_precision, b, v, ref_variant)]
                for source in sources:
                    source_job, vector_mode = b.vector_job(source, name)
                    for method in methods:
                        for mode, direction in _steer_settings(steering, trait.methodology):
                            params = SteerParams(
                                target=v.id,
                                model=_model_params(v.model),
                                source=source,
                                trait=_trait_params(spec, trait),
                                method=method,
                                vector_mode=vector_mode,
                                mode=mode,
                                direction=direction,
                                steering=steering,
                                judge=spec.judge,
                                noise_floor=_wants_noise(steering, v.id, source, ref_variant, mode),
                            )
                            b.add(
                                JobKind.STEER,
                                f"steer {v.id} {name} with {source} {method} {mode}{direction}",
                                params,
                                (source_job.id, *b.after_quantize(v.id)),
                            )


def _plan_imported(b: _Builder) -> None:
    """Steer every variant of a model with each imported vector set made for it (spec
    ``vectors``). The target's own extraction of the trait gives the activation norms that
    scale the coefficients, so the job waits for it."""
    spec = b.spec
    traits = {spec.trait_name(t): t for t in spec.traits}
    for imported in spec.vectors:
        trait = traits[imported.trait]
        model = next(m for m in spec.models if m.name == imported.model)
        if not imported.steer:
            continue
        for v in b.of_model(model):
            norms_job, vector_mode = b.vector_job(v.id, imported.trait)
            source = f"imported-{imported.name}"
            for mode, direction in _steer_settings(spec.steering, trait.methodology):
                params = SteerParams(
                    target=v.id,
                    model=_model_params(v.model),
                    source=source,
                    trait=_trait_params(spec, trait),
                    method="imported",
                    vector_mode=vector_mode,
                    mode=mode,
                    direction=direction,
                    steering=spec.steering,
                    judge=spec.judge,
                    vectors_location=imported.location,
                )
                b.add(
                    JobKind.STEER,
                    f"steer {v.id} {imported.trait} with {source} {mode}{direction}",
                    params,
                    (norms_job.id, *b.after_quantize(v.id)),
                )


def _plan_logit_diff(b: _Builder, methods: Sequence[str]) -> None:
    spec = b.spec
    for model in spec.models:
        for trait in spec.traits:
            if not methodology_info(trait.methodology).logit_diff:
                continue
            ref_variant = f"{model.name}@{spec.reference.value}"
            for v in b.of_model(model):
                cross = _cross_sources(spec.logit_diff.cross_precision, b, v, ref_variant)
                for source in [v.id, *cross]:
                    _add_logit_diff(b, trait, v.id, source, methods)


def _add_logit_diff(
    b: _Builder, trait: TraitRef, variant: str, source: str, methods: Sequence[str]
) -> None:
    """One logit_diff job per method: ``variant`` steered with ``source``'s vectors."""
    spec, name = b.spec, b.spec.trait_name(trait)
    source_job, vector_mode = b.vector_job(source, name)
    with_source = "" if source == variant else f" with {source}"
    for method in methods:
        params = LogitDiffParams(
            variant=variant,
            source=source,
            trait=_trait_params(spec, trait),
            method=method,
            vector_mode=vector_mode,
            logit_diff=spec.logit_diff,
        )
        b.add(
            JobKind.LOGIT_DIFF,
            f"logit_diff {variant} {name} {method}{with_source}",
            params,
            (source_job.id,),
        )


def _plan_capabilities(b: _Builder) -> None:
    """Benchmarks and safety probes of every variant."""
    for v in b.variants:
        for bench in b.spec.benchmarks:
            b.add(
                JobKind.BENCHMARK,
                f"benchmark {v.id} {bench.name}",
                BenchmarkParams(variant=v.id, benchmark=bench),
                b.after_quantize(v.id),
            )
        if b.spec.probes.enabled:
            b.add(
                JobKind.PROBE,
                f"probe {v.id}",
                ProbeParams(variant=v.id, probes=b.spec.probes),
                b.after_quantize(v.id),
            )


def build_plan(spec: ExperimentSpec, run_id: str) -> RunPlan:
    """The job graph of ``spec`` under ``run_id``."""
    validate_run_id(run_id)
    b = _Builder(spec, run_id, variants_of(spec))
    _plan_quantize(b)
    _plan_extract(b)
    steer_methods = list(spec.steering.methods or spec.methods[:1])
    if spec.steering.enabled:
        _plan_steer(b, steer_methods)
        _plan_imported(b)
    if spec.logit_diff.enabled:
        _plan_logit_diff(b, steer_methods)
    _plan_capabilities(b)
    if spec.analysis.enabled:
        params = AnalyzeParams(spec=spec, variants=[v.id for v in b.variants])
        b.add(JobKind.ANALYZE, "analyze", params, tuple(sorted(j.id for j in b.jobs)))
    check_result_keys(spec, b.jobs)
    return RunPlan(
        run_id=run_id, spec_hash=spec.fingerprint(), jobs=b.jobs, description=spec.description
    )


def check_precisions(spec: ExperimentSpec) -> None:
    """Preflight of what variants need on this machine: InvalidArgument names the spec key.

    Every variant has a registered backend that serves its precision and whose engine and
    packages are installed (``gptq``/``awq`` need gptqmodel, the bitsandbytes precisions
    bitsandbytes; ``services.loader.backends.registry``), a published checkpoint given as a
    path exists, and a calibration file named by path reads and is not empty.
    """
    from pathlib import Path

    from services.common.errors import InvalidArgument
    from services.loader.backends.registry import check_variant

    for i, model in enumerate(spec.models):
        for precision in spec.precisions_for(model):
            try:
                check_variant(precision, model.backend, device=model.device)
            except InvalidArgument as err:
                key = "backend" if err.field == "backend" else "precisions"
                raise InvalidArgument(
                    f"models[{i}].{key}", f"{model.name}@{precision.value}: {err.message}"
                ) from None
        for precision, checkpoint in model.checkpoints.items():
            path = Path(checkpoint).expanduser()
            looks_local = checkpoint.startswith(("/", ".", "~")) or path.exists()
            if looks_local and not (path / "config.json").is_file():
                raise InvalidArgument(
                    f"models[{i}].checkpoints.{precision.value}",
                    f"{checkpoint} is not a model folder (no config.json)",
                )
        for precision in spec.precisions_for(model):
            request = quantize_request(spec, model, precision)
            if request is not None and not request.calibration.source.startswith("s3://"):
                from services.quantizer.calibration import load_calibration

                load_calibration(request.calibration)
