"""AWQ weight loader: checkpoints in AWQ GEMM format (4 bits) through gptqmodel's kernels."""

from __future__ import annotations

from services.loader.backends.quantized import QuantizedBackend

__all__ = ["AWQBackend"]


class AWQBackend(QuantizedBackend):
    """AWQ weights; kernel choice in ``services.loader.backends.quantized``."""

    name = "awq"
    method = "awq"
