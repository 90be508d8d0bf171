"""bitsandbytes backend: NF4, FP4 (4-bit, bf16 compute) and LLM.int8(), on CUDA or CPU.

On a CPU without native bf16 matmuls the compute dtype is float32 (``cpu_compute_dtype``).
"""

from __future__ import annotations

import logging

from services.common.precisions import is_8bit
from services.common.variants import Precision
from services.loader.backends.base import Backend, LoadedModel
from services.loader.backends.hf import cpu_compute_dtype, load_tokenizer, resolve_device
from services.loader.model_source import ResolvedSource
from services.loader.placement import cuda_placement

__all__ = ["BitsAndBytesBackend"]


_exact_gemv = False


def exact_cpu_gemv() -> str | None:
    """Make one-token 4-bit matmuls on a CPU compute in their input's dtype; a note if needed.

    On a CPU with avx512_bf16, bitsandbytes' CPU kernel for one-token 4-bit matmuls
    (``gemv_4bit``, which ``matmul_4bit`` takes whenever the input is a single token) casts the
    input to bf16 whatever the compute dtype, so a float32 variant computed its single-row
    decode steps in bf16 there and in float32 on every other CPU (2-4% apart in the golden
    run's nf4 means). This registers the library's own default for the CPU instead
    (dequantize to the input's dtype, one matmul), what every other CPU runs. Process-wide,
    once; nothing on a CPU without avx512_bf16.
    """
    global _exact_gemv
    import bitsandbytes.functional as bnb_functional
    import torch

    if not _exact_gemv:
        if not bnb_functional.has_avx512bf16():
            return None

        @torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu")  # type: ignore[untyped-decorator]
        def _gemv(
            A: torch.Tensor,
            B: torch.Tensor,
            shapeB: list[int],
            absmax: torch.Tensor,
            code: torch.Tensor,
            blocksize: int,
        ) -> torch.Tensor:
            quant_type = "fp4" if code[1] > 0 else "nf4"
            weight = torch.ops.bitsandbytes.dequantize_4bit.default(
                B, absmax, blocksize, quant_type, shapeB, A.dtype
            )
            return torch.nn.functional.linear(A, weight)

        _exact_gemv = True
    return (
        "one-token 4-bit matmuls dequantize to the compute dtype on this CPU (bitsandbytes' "
        "avx512_bf16 kernel would compute them in bf16)"
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
        gemv_note = (
            exact_cpu_gemv()
            if dev.type == "cpu" and not is_8bit(precision) and compute != torch.bfloat16
            else None
        )
        model.eval()
        qconfig = config.to_dict()
        qconfig = {
            k: (str(v) if not isinstance(v, (int, float, bool, str, type(None), list, dict)) else v)
            for k, v in qconfig.items()
        }
        notes = [*source.notes, *([note] if note else []), *([gemv_note] if gemv_note else [])]
        return LoadedModel(model, load_tokenizer(source), dev, compute, qconfig, notes)
