"""Plain transformers backend: fp32, bf16 and fp16 weights."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from services.common import settings as settings_mod
from services.common.variants import Precision
from services.loader.backends.base import Backend, LoadedModel
from services.loader.model_source import ResolvedSource
from services.loader.placement import cuda_placement
from services.loader.tiny import direct_options
from services.loader.tiny_direct import build_direct

__all__ = ["HFBackend", "cpu_compute_dtype", "load_tokenizer", "resolve_device"]

# CPU flags that give bf16 / fp16 matmuls a native path (oneDNN AVX512-BF16/FP16 or AMX).
_NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_tokenizer(source: ResolvedSource) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_compute_dtype(dtype: Any, device: Any) -> tuple[Any, str | None]:
    """The activation dtype for ``dtype`` weights on ``device``, and a note when it differs.

    On a CPU without native bf16/fp16 matmuls (``QSENS_LOADER_CPU_COMPUTE=auto``) half-precision
    matmuls are emulated and run several times slower than float32, so activations are computed
    in float32 there; the weights keep the variant's rounding. Elsewhere the dtype is kept.
    """
    import torch

    kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if device.type != "cpu" or kind is None:
        return dtype, None
    mode = settings_mod.get(settings_mod.LoaderSettings).cpu_compute
    flags = _cpu_flags()
    if mode == "native" or (mode == "auto" and (not flags or _has_native(flags, kind))):
        return dtype, None
    return torch.float32, (
        f"activations computed in float32 on this CPU (weights rounded to {kind}): it has no "
        f"native {kind} matmul (QSENS_LOADER_CPU_COMPUTE={mode})"
    )


def _has_native(flags: frozenset[str], kind: str) -> bool:
    return any(flag in flags for flag in _NATIVE_FLAGS[kind])


class HFBackend(Backend):
    """Unquantized weights through ``AutoModelForCausalLM.from_pretrained``."""

    name = "hf"

    def load(self, source: ResolvedSource, precision: Precision, device: str) -> LoadedModel:
        import torch

        dtype = {
            Precision.FP32: torch.float32,
            Precision.BF16: torch.bfloat16,
            Precision.FP16: torch.float16,
        }[precision]
        dev = resolve_device(device)
        on_gpu = dev.type == "cuda"
        placement = (
            cuda_placement(str(source.folder), precision, dev.index or 0) if on_gpu else None
        )
        note: str | None
        if placement is not None:  # several GPUs, layer by layer
            model = _weights(source, dtype, placement.device_map)
            dev = model.get_input_embeddings().weight.device  # inputs go where it is
            compute, note = dtype, placement.note()
        else:
            model = _weights(source, dtype, {"": dev})
            compute, note = cpu_compute_dtype(dtype, dev)
            if compute != dtype:
                model.to(compute)
            model.to(dev)
        model.eval()
        notes = [*source.notes, *([note] if note else [])]
        if direct_options(source.folder) is not None:
            notes.append("random weights drawn block by block on their devices (direct=1)")
        return LoadedModel(model, load_tokenizer(source), dev, compute, {}, notes)


def _weights(source: ResolvedSource, dtype: Any, device_map: dict[str, Any]) -> Any:
    """The model in ``dtype`` over ``device_map``: read from the folder (a single-device map
    loads on the CPU, the caller moves it), or drawn on the devices for a ``direct=1`` tiny
    model. Loading in the variant's dtype rounds the weights to it; an upcast after that keeps
    exactly those values."""
    from transformers import AutoModelForCausalLM

    if direct_options(source.folder) is not None:
        return build_direct(source.folder, device_map, dtype)
    if "" in device_map:
        return AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(
        str(source.folder), dtype=dtype, device_map=device_map
    )
