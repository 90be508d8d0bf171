"""Shared loading of GPTQ and AWQ checkpoints through gptqmodel, with an explicit kernel choice.

A checkpoint is a folder whose ``config.json`` has a ``quantization_config`` of the backend's
method: made by the quantize job (``qsens-quantize.json`` inside says how, with which
calibration set) or published (a folder or a hub id in the local cache). gptqmodel replaces
each quantized ``nn.Linear`` by its kernel's module and returns an ordinary transformers model,
so hooks, steering and capture work exactly as for bf16.

Kernels are tried in order and the first that loads serves; ``Info`` names it:

=======  ==========  =========================================================================
method   device      kernels, in order of preference
=======  ==========  =========================================================================
gptq 4   CPU         aten int4pack (``_weight_int4pack_mm_for_cpu``), then plain torch (slow)
gptq 8   CPU         torch int8 (CPU fused), then plain torch
awq 4    CPU         aten int4pack, then plain torch
gptq     CUDA        Marlin (symmetric), Machete (Hopper), Triton, then plain torch
awq      CUDA        AWQ Marlin, Triton GEMM (float16 only), then plain torch
=======  ==========  =========================================================================

gptqmodel compiles Marlin and Machete with ``nvcc`` from the sources its wheel ships, on first
use (seen serving on an H100); where no ``nvcc`` is installed they fail to load and the Triton
kernels (compiled by Triton at first use) serve instead.
A checkpoint larger than one card's budget is placed layer-wise over several GPUs with the
loader's placement (``services.loader.placement``, ``QSENS_LOADER_GPUS``) and handed to
gptqmodel as an explicit ``device_map`` (left without one, gptqmodel spreads the layers over
every visible GPU in turn); on one device the map names that device alone.
Activations are computed in bfloat16 (the study's reference precision) except where a kernel
takes float16 only (AWQ's Triton GEMM): ``Info.dtype`` and ``compute_dtype`` report which.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.common.logging import get_logger
from services.common.variants import Precision
from services.loader.backends.base import Backend, LoadedModel
from services.loader.backends.hf import cpu_compute_dtype, load_tokenizer, resolve_device
from services.loader.model_source import ResolvedSource
from services.loader.placement import Placement, cuda_placement

__all__ = [
    "QuantizedBackend",
    "gptqmodel_device_map",
    "kernel_candidates",
    "load_quantized",
    "read_quantization_config",
]

log = get_logger(__name__)

# gptqmodel BACKEND names per (method, device type, bits); see the module docstring.
_CPU_KERNELS: dict[tuple[str, int], tuple[str, ...]] = {
    ("gptq", 4): ("GPTQ_TORCH_ATEN", "GPTQ_TORCH"),
    ("gptq", 8): ("GPTQ_TORCH_INT8", "GPTQ_TORCH"),
    ("awq", 4): ("AWQ_TORCH_ATEN", "AWQ_TORCH"),
}
_CUDA_KERNELS: dict[str, tuple[str, ...]] = {
    "gptq": ("GPTQ_MARLIN", "GPTQ_MACHETE", "GPTQ_TRITON", "GPTQ_TORCH"),
    "awq": ("AWQ_MARLIN", "AWQ_GEMM_TRITON", "AWQ_TORCH"),
}
# Kernels that take float16 activations only; every other one runs in bfloat16.
_FLOAT16_KERNELS = frozenset({"AWQ_GEMM_TRITON"})
_ATEN_GROUPS = (32, 64, 128, 256)


def kernel_candidates(
    method: str, device_type: str, bits: int, group_size: int, sym: bool
) -> list[str]:
    """gptqmodel backend names to try, best first."""
    if device_type == "cuda":
        names = list(_CUDA_KERNELS[method])
        if method == "gptq" and not sym:
            names.remove("GPTQ_MARLIN")  # GPTQ Marlin needs symmetric weights
        return names
    names = list(_CPU_KERNELS.get((method, bits), (f"{method.upper()}_TORCH",)))
    if names[0].endswith("_ATEN") and group_size not in _ATEN_GROUPS:
        names.pop(0)  # the int4pack op takes groups of 32, 64, 128 or 256 only
    return names


def read_quantization_config(source: ResolvedSource, method: str) -> dict[str, Any]:
    """The checkpoint's quantization config; InvalidArgument unless it is a ``method`` checkpoint."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source.folder)).to_dict()
    except (OSError, ValueError) as err:
        raise InvalidArgument(
            "model", f"cannot read the config of {source.source}: {err}"
        ) from None
    qconfig = config.get("quantization_config")
    found = str((qconfig or {}).get("quant_method", "")).lower()
    if not isinstance(qconfig, dict) or found != method:
        what = f"quant_method {found!r}" if found else "no quantization_config"
        raise InvalidArgument(
            "model",
            f"{source.source} is not a {method.upper()} checkpoint (its config.json has {what}); "
            f"serve unquantized weights as bf16, or quantize them with a quantize job",
        )
    return qconfig


def _import_gptqmodel() -> Any:
    # gptqmodel sizes its CPU worker pool from os.cpu_count() (one worker on 2 cores stalls it).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel

    return gptqmodel


def gptqmodel_device_map(placement: Placement | None, device: Any) -> dict[str, str]:
    """gptqmodel's ``device_map``: the placement's units on ``cuda:<index>``, or everything on
    ``device`` (its index made explicit) when there is no placement."""
    if placement is not None:
        return {
            name: f"cuda:{where}" if isinstance(where, int) else str(where)
            for name, where in placement.device_map.items()
        }
    if device.type == "cuda":
        return {"": f"cuda:{device.index or 0}"}
    return {"": str(device)}


def load_quantized(
    folder: Path, method: str, kernel: str, dtype: Any, device_map: dict[str, str]
) -> Any:
    """gptqmodel's wrapper of the ``method`` checkpoint in ``folder`` through ``kernel`` (a
    gptqmodel BACKEND name), its modules placed by ``device_map``."""
    gptqmodel = _import_gptqmodel()
    return gptqmodel.GPTQModel.load(
        str(folder),
        backend=getattr(gptqmodel.BACKEND, kernel),
        device_map=device_map,
        dtype=dtype,
    )


class QuantizedBackend(Backend):
    """GPTQ or AWQ weights through gptqmodel; subclasses set ``method``."""

    method: str = ""

    def __init__(self) -> None:
        self._wrapper: Any = None  # gptqmodel's BaseQModel, kept alive with the model

    def load(self, source: ResolvedSource, precision: Precision, device: str) -> LoadedModel:
        import torch

        qconfig = read_quantization_config(source, self.method)
        dev = resolve_device(device)
        bits = int(qconfig.get("bits", 4))
        group_size = int(qconfig.get("group_size", 128))
        sym = bool(qconfig.get("sym", not qconfig.get("zero_point", False)))
        placement = (
            cuda_placement(str(source.folder), precision, dev.index or 0)
            if dev.type == "cuda"
            else None
        )
        device_map = gptqmodel_device_map(placement, dev)
        errors: list[str] = []
        for name in kernel_candidates(self.method, dev.type, bits, group_size, sym):
            dtype = torch.float16 if name in _FLOAT16_KERNELS else torch.bfloat16
            try:
                self._wrapper = load_quantized(source.folder, self.method, name, dtype, device_map)
                break
            except Exception as err:  # a kernel unavailable here: try the next one
                log.warning("kernel refused", extra={"kernel": name, "error": repr(err)[:300]})
                errors.append(f"{name}: {err}")
        else:
            raise InvalidArgument(
                "model", f"no {self.method} kernel could load {source.source}: {'; '.join(errors)}"
            )
        model = self._wrapper.model
        model.eval()
        if placement is not None:  # inputs go where the embeddings are
            dev = model.get_input_embeddings().weight.device
        kernel = _kernel_of(model)
        compute, compute_note = cpu_compute_dtype(dtype, dev)
        if compute != dtype:
            _float32_around_kernels(model, dtype, compute)
        described = _described(source, qconfig, self.method, kernel, name, compute, dtype)
        info = _made_by(source.folder)
        notes = [*info.get("source", {}).get("notes", []), *source.notes, _note(described, errors)]
        if placement is not None:
            notes.append(placement.note())
        if compute_note:
            notes.append(f"{compute_note}; the int4 kernels take {described['kernel_input_dtype']}")
        return LoadedModel(model, load_tokenizer(source), dev, compute, described, notes)


def _described(
    source: ResolvedSource,
    qconfig: dict[str, Any],
    method: str,
    kernel: str,
    backend: str,
    compute: Any,
    dtype: Any,
) -> dict[str, Any]:
    """The quantization facts ``Info`` reports."""
    info = _made_by(source.folder)
    return {
        "method": method,
        "bits": int(qconfig.get("bits", 4)),
        "group_size": int(qconfig.get("group_size", 128)),
        "sym": bool(qconfig.get("sym", not qconfig.get("zero_point", False))),
        "desc_act": bool(qconfig.get("desc_act", False)),
        "format": str(qconfig.get("checkpoint_format") or qconfig.get("format") or ""),
        "kernel": kernel,
        "kernel_backend": backend,
        "compute_dtype": str(compute).removeprefix("torch."),
        "kernel_input_dtype": str(dtype).removeprefix("torch."),
        "checkpoint": info.get("checkpoint", source.source),
        "made_by": "qsens quantize job" if info else "published checkpoint",
        "calibration_sha256": info.get("calibration", {}).get("sha256", "unknown"),
        "calibration_samples": info.get("calibration", {}).get("samples"),
        "calibration_tokens": info.get("calibration", {}).get("tokens"),
        "quantizer": info.get("libraries", {}).get("gptqmodel", qconfig.get("quantizer")),
    }


def _float32_around_kernels(model: Any, kernel_dtype: Any, compute: Any) -> None:
    """Run everything but the quantized matmuls in ``compute`` (float32 on an AVX2 CPU).

    The CPU int4 kernels only take half-precision activations, so each quantized linear casts
    its input to ``kernel_dtype`` and its output back: the quantized matmuls compute exactly as
    in a half-precision model, while norms, attention, embeddings and the head (unquantized,
    and emulated slowly in bf16 on such CPUs) run in float32 on the same bf16 weights.
    """
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            module.register_forward_pre_hook(lambda _m, args: (args[0].to(kernel_dtype), *args[1:]))
            module.register_forward_hook(lambda _m, _args, out: out.to(compute))
        else:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.dtype == kernel_dtype:
                    tensor.data = tensor.data.to(compute)


def _kernel_of(model: Any) -> str:
    """The class name of the first quantized linear module (what actually runs)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            return type(module).__name__
    return "unknown"


def _made_by(folder: Path) -> dict[str, Any]:
    """The quantize job's record in the folder plus the checkpoint id ({} when published)."""
    from services.quantizer.checkpoint import checkpoint_info

    info = checkpoint_info(folder)
    manifest = folder / "manifest.json"
    if info and manifest.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = {**info, "checkpoint": json.loads(manifest.read_text())["checkpoint"]}
    return info


def _note(d: dict[str, Any], errors: list[str]) -> str:
    group = "row" if d["group_size"] == -1 else f"g{d['group_size']}"
    text = (
        f"{d['method'].upper()} {d['bits']}-bit {group} {'sym' if d['sym'] else 'asym'}"
        f"{' desc_act' if d['desc_act'] else ''} ({d['made_by']}"
        + (
            f", calibration sha256 {d['calibration_sha256'][:12]}"
            if d["made_by"] != "published checkpoint"
            else ""
        )
        + f"); kernel {d['kernel']}, activations in {d['compute_dtype']}"
    )
    if errors:
        text += f"; kernels refused first: {'; '.join(e.split(':')[0] for e in errors)}"
    return text
