"""bitsandbytes backend: NF4, FP4 (4-bit, bf16 compute) and LLM.int8(), on CUDA or CPU.

On a CPU without native bf16 matmuls the compute dtype is float32 (``cpu_compute_dtype``).
"""

from __future__ import annotations

import logging
from typing import Any

from services.common.precisions import is_8bit
from services.common.variants import Precision
from services.loader.backends.base import Backend, LoadedModel
from services.loader.backends.hf import cpu_compute_dtype, load_tokenizer, resolve_device
from services.loader.model_source import ResolvedSource
from services.loader.placement import cuda_placement

__all__ = ["BitsAndBytesBackend"]


def float32_cpu_4bit(model: Any) -> str | None:
    """Keep a float32 4-bit model's CPU matmuls in float32; a note where that was needed.

    On a CPU with avx512_bf16, bitsandbytes' ``Linear4bit`` repacks its weights on the first
    CPU forward into a layout for a fused kernel that casts the input to bf16, whatever the
    compute dtype, and then sends every matmul there: a float32 nf4 variant computed in bf16
    on such CPUs and in float32 on every other. Switching that off per module keeps the
    library's usual path (dequantize to the compute dtype, one matmul) — what other CPUs run.
    """
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    if not has_avx512bf16():
        return None
    modules = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for module in modules:
        module.support_avx512bf16_for_cpu = False
    return (
        f"4-bit matmuls in the compute dtype on this CPU ({len(modules)} modules kept off "
        "bitsandbytes' avx512_bf16 kernel, which computes in bf16)"
    )


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in str(record.msg)


class BitsAndBytesBackend(Backend):
    """Quantize at load time with ``BitsAndBytesConfig`` (the standard QLoRA / int8 settings)."""

    name = "bnb"

    def load(self, source: ResolvedSource, precision: Precision, device: str) -> LoadedModel:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        # LLM.int8() casts its inputs to fp16 and logs it on every matmul.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastNotice())
        dev = resolve_device(device)
        # On a CPU without native bf16/fp16 matmuls, the unquantized modules and the 4-bit
        # compute run in float32 (several times faster there); the quantized weights are the same.
        half = torch.float16 if is_8bit(precision) and dev.type == "cuda" else torch.bfloat16
        compute, note = cpu_compute_dtype(half, dev)
        if is_8bit(precision):
            # Non-quantized modules (embeddings, norms, head) stay fp16 on GPU as in the
            # LLM.int8() paper.
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4" if precision is Precision.NF4 else "fp4",
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=False,
            )
        placement = (
            cuda_placement(str(source.folder), precision, dev.index or 0)
            if dev.type == "cuda"
            else None
        )
        device_map: dict[str, int | str] = (
            placement.device_map
            if placement is not None
            else {"": dev.index or 0}
            if dev.type == "cuda"
            else {"": "cpu"}
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), quantization_config=config, dtype=half, device_map=device_map
        )
        if placement is not None:  # inputs go where the embeddings are
            dev = model.get_input_embeddings().weight.device
            note = placement.note()
        if compute != half:
            # Loaded (and quantized) from the half-precision weights as on a GPU, so the
            # quantized weights are the same; only the unquantized modules are upcast.
            for tensor in (*model.parameters(), *model.buffers()):
                if tensor.dtype == half:
                    tensor.data = tensor.data.to(compute)
        cpu_note = (
            float32_cpu_4bit(model)
            if dev.type == "cpu" and not is_8bit(precision) and compute != torch.bfloat16
            else None
        )
        model.eval()
        qconfig = config.to_dict()
        qconfig = {
            k: (str(v) if not isinstance(v, (int, float, bool, str, type(None), list, dict)) else v)
            for k, v in qconfig.items()
        }
        notes = [*source.notes, *([note] if note else []), *([cpu_note] if cpu_note else [])]
        return LoadedModel(model, load_tokenizer(source), dev, compute, qconfig, notes)
