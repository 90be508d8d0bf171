"""The local stack's children for a spec: one loader per variant (announced in the registry),
the judge service and one worker per service, and waiting for their ready files."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.errors import InvalidArgument
from services.common.localstack import ChildSpec, free_ports
from services.common.spec import ExperimentSpec, load_spec

if TYPE_CHECKING:
    from services.common.planner import PlannedVariant

__all__ = ["LOCAL_CONCURRENCY", "children_for_spec", "wait_ready"]


def _waiting_note(request: Any) -> str:
    """What `qsens up` says about a loader that waits for a quantize job's checkpoint."""
    from services.common.quantization import checkpoint_id

    job = f"quantize {request.model}@{request.method}"
    what = "its checkpoint"
    if not request.calibration.source.startswith("s3://"):  # S3 is not up yet: no id then
        from services.quantizer.calibration import load_calibration

        sha = load_calibration(request.calibration).sha256
        what = f"checkpoint {checkpoint_id(request, sha)}"
    return (
        f"waiting for {what}, made by the job '{job}' of the run; not waited for here "
        "(`qsens status RUN` shows it)"
    )


#: Jobs in flight per local worker where one is not enough: a job alternates between its
#: variant's loader, S3 and (steerer) the judge, itself waiting on the reference loader, so one
#: job at a time leaves a core idle; two jobs usually run on different variants' loaders.
LOCAL_CONCURRENCY = {"steerer": 2, "extractor": 2}


def children_for_spec(spec_path: Path, home: Path) -> list[ChildSpec]:
    """Loaders (one per variant), the judge service and the workers ``spec_path`` needs."""
    from services.common.planner import quantize_request, variants_of

    spec = load_spec(spec_path)
    variants = variants_of(spec)
    ready = home / "ready"
    ready.mkdir(parents=True, exist_ok=True)
    for stale in ready.glob("*.json"):
        stale.unlink()
    python = [sys.executable, "-m", "services.cli.main"]
    ports = free_ports(len(variants))
    children: list[ChildSpec] = []
    reference_port = None
    judge_port = None  # the loader backend's judge: spec.judge.variant, else the reference
    for variant, port in zip(variants, ports, strict=True):
        if variant.precision == spec.reference and reference_port is None:
            reference_port = port
        if variant.id == spec.judge.variant:
            judge_port = port
        children.append(_loader_child(spec, variant, port, ready, python))
    if spec.judge.variant and judge_port is None:
        raise InvalidArgument(
            "judge.variant",
            f"{spec.judge.variant!r} is not a variant of this spec "
            f"({', '.join(v.id for v in variants)})",
        )
    children.append(_judge_child(spec, ready, python, judge_port or reference_port))
    services = ["extractor", "steerer", "analyzer"]
    if any(quantize_request(spec, v.model, v.precision) for v in variants):
        services.append("quantizer")
    for service in services:
        argv = [*python, "worker", "run", service]
        if service in LOCAL_CONCURRENCY:
            argv += ["--concurrency", str(LOCAL_CONCURRENCY[service])]
        children.append(ChildSpec(name=f"worker-{service}", argv=argv))
    return children


def wait_ready(paths: list[Path], timeout_s: float = 900.0) -> None:
    """Block until every path exists."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready: {[str(p) for p in paths if not p.exists()]}")
        time.sleep(0.5)


def _loader_child(
    spec: ExperimentSpec, variant: PlannedVariant, port: int, ready: Path, python: list[str]
) -> ChildSpec:
    """The loader of one variant (not waited for when a quantize job of the run makes its
    checkpoint)."""
    from services.common.planner import loader_source, quantize_request

    request = quantize_request(spec, variant.model, variant.precision)
    argv = [
        *python,
        "serve",
        "loader",
        "--model",
        loader_source(variant.model, variant.precision),
        "--precision",
        variant.precision.value,
        "--name",
        variant.model.name,
        "--device",
        variant.model.device,
        "--port",
        str(port),
        "--http-port",
        "0",
        "--announce",
        "--ready-file",
        str(ready / f"loader-{variant.id}.json"),
    ]
    if variant.model.backend:
        argv += ["--backend", variant.model.backend]
    if request is not None:
        argv += ["--quantize", request.model_dump_json()]
    return ChildSpec(
        name=f"loader-{variant.id}",
        argv=argv,
        # A loader whose checkpoint a quantize job of the run will make waits for it
        # in S3 (announced 'waiting' in the registry); `up` must not wait for it.
        ready_file=None if request else str(ready / f"loader-{variant.id}.json"),
        ready_timeout_s=900.0,
        stop_timeout_s=40.0,
        note=_waiting_note(request) if request else "",
        variant=variant.id,  # the supervisor declares it (fail fast when none comes)
    )


def _judge_child(
    spec: ExperimentSpec, ready: Path, python: list[str], loader_port: int | None
) -> ChildSpec:
    """The judge service: the loader backend judges on ``loader_port``'s variant, the
    embedding backend's perplexity uses it (the reference precision's loader by default)."""
    from services.cli import judge_key

    judge = [
        *python,
        "judge",
        "serve",
        *spec.judge.serve_args(),
        "--ready-file",
        str(ready / "judge.json"),
    ]
    if spec.judge.backend in ("embedding", "loader") and loader_port is not None:
        judge += ["--loader-address", f"127.0.0.1:{loader_port}"]
    # A spec's judge endpoint gets the API key only if allow-listed (see judge_key).
    trusted = judge_key.key_allowed(spec.judge.base_url)
    return ChildSpec(
        name="judge",
        argv=judge,
        ready_file=str(ready / "judge.json"),
        ready_timeout_s=300.0,
        unset_env=() if trusted else judge_key.KEY_VARIABLES,
        note="" if trusted else judge_key.withheld_note(str(spec.judge.base_url)),
    )
