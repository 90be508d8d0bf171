"""Where a spec's models and data live, and the check that a spec bound for a cluster names
no path on this machine."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.precisions import precision_info
from services.common.quantization import BUILTIN_CALIBRATION
from services.common.spec.experiment import ExperimentSpec

__all__ = ["check_portable", "data_locations", "model_locations"]


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
