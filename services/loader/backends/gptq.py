"""GPTQ weight loader: checkpoints in GPTQ format (4 or 8 bits) through gptqmodel's kernels."""

from __future__ import annotations

from services.loader.backends.quantized import QuantizedBackend

__all__ = ["GPTQBackend"]


class GPTQBackend(QuantizedBackend):
    """GPTQ weights; kernel choice in ``services.loader.backends.quantized``."""

    name = "gptq"
    method = "gptq"
