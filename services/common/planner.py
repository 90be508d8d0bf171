"""Turn an experiment spec into a run: the DAG of jobs every worker will execute.

extract (reference first when replaying) -> steer / logit_diff -> analyze, with benchmark and
probe jobs beside. A gptq/awq variant without a published checkpoint gets a quantize job first:
every job that talks to that variant's loader depends on it (the loader waits for the
checkpoint the job commits; see ``services.common.quantization``). Job params carry everything a worker needs (no worker reads the spec file),
so a job is reproducible from its own JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from services.common.jobs import Job, JobKind, RunPlan, validate_run_id
from services.common.quantization import QuantizeRequest
from services.common.spec import ExperimentSpec, ModelSpec, TraitRef
from services.common.variants import Precision

__all__ = [
    "PlannedVariant",
    "build_plan",
    "loader_source",
    "new_run_id",
    "quantize_request",
    "variants_of",
]


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
    if precision not in (Precision.GPTQ, Precision.AWQ) or precision in model.checkpoints:
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


def _trait_params(spec: ExperimentSpec, trait: TraitRef) -> dict[str, Any]:
    return {"ref": trait.ref, "name": spec.trait_name(trait), "methodology": trait.methodology}


def build_plan(spec: ExperimentSpec, run_id: str) -> RunPlan:
    """The job graph of ``spec`` under ``run_id``."""
    validate_run_id(run_id)
    jobs: list[Job] = []
    variants = variants_of(spec)
    judge = spec.judge.model_dump(mode="json")
    extraction = spec.extraction.model_dump(mode="json")
    # extract[(variant, trait, mode)] -> job
    extract: dict[tuple[str, str, str], Job] = {}
    quantize: dict[str, Job] = {}
    for v in variants:
        request = quantize_request(spec, v.model, v.precision)
        if request is not None:
            quantize[v.id] = Job(
                kind=JobKind.QUANTIZE,
                run_id=run_id,
                name=f"quantize {v.id}",
                params=request.model_dump(mode="json"),
            )
            jobs.append(quantize[v.id])

    def after_quantize(variant: str) -> tuple[str, ...]:
        """Deps of a job that needs ``variant``'s loader: its quantize job, if any."""
        job = quantize.get(variant)
        return (job.id,) if job is not None else ()

    for model in spec.models:
        ref_variant = f"{model.name}@{spec.reference.value}"
        model_variants = [v for v in variants if v.model.name == model.name]
        for trait in spec.traits:
            name = spec.trait_name(trait)
            position = spec.position_for(trait)
            response_position = position.startswith("response")
            for v in model_variants:
                is_ref = v.id == ref_variant
                modes: list[str]
                if is_ref or not response_position or spec.extraction.replay == "off":
                    modes = ["native"]
                elif spec.extraction.replay == "on":
                    modes = ["replay"]
                else:
                    modes = ["native", "replay"]
                for mode in modes:
                    deps: tuple[str, ...] = ()
                    replay_from = None
                    if mode == "replay":
                        replay_from = ref_variant
                        deps = (extract[(ref_variant, name, "native")].id,)
                    job = Job(
                        kind=JobKind.EXTRACT,
                        run_id=run_id,
                        name=f"extract {v.id} {name} {mode}",
                        params={
                            "variant": v.id,
                            "model": _model_params(v.model),
                            "precision": v.precision.value,
                            "trait": _trait_params(spec, trait),
                            "mode": mode,
                            "replay_from": replay_from,
                            "position": position,
                            "layers": spec.layers,
                            "methods": list(spec.methods),
                            "extraction": extraction,
                            "judge": judge,
                        },
                        deps=deps + after_quantize(v.id),
                    )
                    extract[(v.id, name, mode)] = job
                    jobs.append(job)

    def vector_job(variant: str, trait: str) -> tuple[Job, str]:
        """The extraction whose vectors a variant uses: replay when it exists (controlled)."""
        for mode in ("replay", "native"):
            job = extract.get((variant, trait, mode))
            if job is not None:
                return job, mode
        raise KeyError((variant, trait))

    downstream: list[Job] = []
    steering = spec.steering
    steer_traits = steering.traits or [spec.trait_name(t) for t in spec.traits]
    steer_methods = list(steering.methods or spec.methods[:1])
    if steering.enabled:
        for model in spec.models:
            ref_variant = f"{model.name}@{spec.reference.value}"
            for trait in spec.traits:
                name = spec.trait_name(trait)
                if name not in steer_traits:
                    continue
                for v in (x for x in variants if x.model.name == model.name):
                    sources = [v.id]
                    if steering.cross_precision and v.id != ref_variant:
                        sources.append(ref_variant)
                    for source in sources:
                        source_job, vector_mode = vector_job(source, name)
                        for method in steer_methods:
                            settings: list[tuple[str, str]] = [
                                ("add", d) for d in steering.directions
                            ]
                            if steering.ablation and trait.methodology == "arditi":
                                settings.append(("ablate", "-"))
                            for mode, direction in settings:
                                downstream.append(
                                    Job(
                                        kind=JobKind.STEER,
                                        run_id=run_id,
                                        name=f"steer {v.id} {name} with {source} {method} {mode}{direction}",
                                        params={
                                            "target": v.id,
                                            "model": _model_params(v.model),
                                            "source": source,
                                            "trait": _trait_params(spec, trait),
                                            "method": method,
                                            "vector_mode": vector_mode,
                                            "mode": mode,
                                            "direction": direction,
                                            "steering": steering.model_dump(mode="json"),
                                            "judge": judge,
                                        },
                                        deps=(source_job.id, *after_quantize(v.id)),
                                    )
                                )
    if spec.logit_diff.enabled:
        for model in spec.models:
            for trait in spec.traits:
                if trait.methodology != "caa":
                    continue
                name = spec.trait_name(trait)
                for v in (x for x in variants if x.model.name == model.name):
                    source_job, vector_mode = vector_job(v.id, name)
                    for method in steer_methods:
                        downstream.append(
                            Job(
                                kind=JobKind.LOGIT_DIFF,
                                run_id=run_id,
                                name=f"logit_diff {v.id} {name} {method}",
                                params={
                                    "variant": v.id,
                                    "source": v.id,
                                    "trait": _trait_params(spec, trait),
                                    "method": method,
                                    "vector_mode": vector_mode,
                                    "logit_diff": spec.logit_diff.model_dump(mode="json"),
                                },
                                deps=(source_job.id,),
                            )
                        )
    for v in variants:
        for bench in spec.benchmarks:
            downstream.append(
                Job(
                    kind=JobKind.BENCHMARK,
                    run_id=run_id,
                    name=f"benchmark {v.id} {bench.name}",
                    params={"variant": v.id, "benchmark": bench.model_dump(mode="json")},
                    deps=after_quantize(v.id),
                )
            )
        if spec.probes.enabled:
            downstream.append(
                Job(
                    kind=JobKind.PROBE,
                    run_id=run_id,
                    name=f"probe {v.id}",
                    params={"variant": v.id, "probes": spec.probes.model_dump(mode="json")},
                    deps=after_quantize(v.id),
                )
            )
    jobs.extend(downstream)
    if not spec.analysis.enabled:
        return RunPlan(
            run_id=run_id, spec_hash=spec.fingerprint(), jobs=jobs, description=spec.description
        )
    analyze = Job(
        kind=JobKind.ANALYZE,
        run_id=run_id,
        name="analyze",
        params={"spec": spec.model_dump(mode="json"), "variants": [v.id for v in variants]},
        deps=tuple(sorted(j.id for j in jobs)),
    )
    jobs.append(analyze)
    return RunPlan(
        run_id=run_id, spec_hash=spec.fingerprint(), jobs=jobs, description=spec.description
    )


def check_precisions(spec: ExperimentSpec) -> None:
    """Preflight of what variants need on this machine: InvalidArgument names the spec key.

    Every precision's backend packages are installed (``gptq``/``awq`` need gptqmodel, the
    bitsandbytes precisions bitsandbytes), a published checkpoint given as a path exists, and
    a calibration file named by path reads and is not empty.
    """
    from pathlib import Path

    from services.common.errors import InvalidArgument
    from services.loader.backends.base import missing_packages

    for i, model in enumerate(spec.models):
        for precision in spec.precisions_for(model):
            missing = missing_packages(precision, model.backend)
            if missing:
                raise InvalidArgument(
                    f"models[{i}].precisions",
                    f"{model.name}@{precision.value} needs the package(s) "
                    f"{', '.join(missing)}, which are not installed here "
                    f"(pip install -e '.[quant]' or `make install`)",
                )
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
