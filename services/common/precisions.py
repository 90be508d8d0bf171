"""The precision table: every fact about a precision that more than one stage needs.

Stages ask this table instead of comparing precision names: bit width (the analyzer's grouped
tests), family and display order (figures and tables), whether weights are 8-bit
(LLM.int8()'s data-dependent outlier decomposition: the report's caveat, the engine's
bitsandbytes config and its CUDA-graph exclusions), whether the platform makes the
checkpoint itself (GPTQ/AWQ quantize jobs), and which kernels were checked under graph
capture.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from services.common.errors import InvalidArgument
from services.common.variants import Precision, parse_precision

__all__ = [
    "PRECISIONS",
    "Family",
    "PrecisionFacts",
    "bits",
    "by_display_order",
    "display_rank",
    "is_8bit",
    "precision_info",
]

Family = Literal["float", "bitsandbytes", "gptq", "awq", "fp8"]


@dataclass(frozen=True)
class PrecisionFacts:
    """One precision's facts."""

    precision: Precision
    bits: int  # weight bits (GPTQ/AWQ: the 4-bit configuration the study uses)
    family: Family
    label: str  # how tables and figures name it
    quantized: bool
    bits_assumed: bool = False  # the checkpoint's own bits are not read: counted as ``bits``
    platform_quantized: bool = False  # a quantize job makes the checkpoint when none is given
    data_dependent_kernels: bool = False  # LLM.int8(): outlier columns depend on the input
    graph_checked: bool = True  # kernels checked under decode-graph capture (bench/gpu_check)

    @property
    def is_8bit(self) -> bool:
        """8-bit bitsandbytes weights (LLM.int8()); fp8 is a float format of its own."""
        return self.bits == 8 and self.family == "bitsandbytes"

    @property
    def display_rank(self) -> int:
        """Position in tables and figures: widest first, then by family."""
        return _ORDER.index(self.precision)


def _float(p: Precision, bits: int, label: str) -> PrecisionFacts:
    return PrecisionFacts(p, bits, "float", label, quantized=False)


PRECISIONS: dict[Precision, PrecisionFacts] = {
    Precision.FP32: _float(Precision.FP32, 32, "FP32"),
    Precision.BF16: _float(Precision.BF16, 16, "BF16"),
    Precision.FP16: _float(Precision.FP16, 16, "FP16"),
    Precision.INT8: PrecisionFacts(
        Precision.INT8, 8, "bitsandbytes", "INT8", quantized=True, data_dependent_kernels=True
    ),
    Precision.NF4: PrecisionFacts(Precision.NF4, 4, "bitsandbytes", "NF4", quantized=True),
    Precision.FP4: PrecisionFacts(Precision.FP4, 4, "bitsandbytes", "FP4", quantized=True),
    Precision.GPTQ: PrecisionFacts(
        Precision.GPTQ,
        4,
        "gptq",
        "GPTQ",
        quantized=True,
        bits_assumed=True,
        platform_quantized=True,
        graph_checked=False,
    ),
    Precision.AWQ: PrecisionFacts(
        Precision.AWQ,
        4,
        "awq",
        "AWQ",
        quantized=True,
        bits_assumed=True,
        platform_quantized=True,
        graph_checked=False,
    ),
    # Quantized by vLLM when the model loads: no checkpoint of its own, no quantize job.
    Precision.FP8: PrecisionFacts(
        Precision.FP8, 8, "fp8", "FP8", quantized=True, graph_checked=False
    ),
}

# Display order: the figures' historical order (reference widths first, int8 before 4-bit).
_ORDER: tuple[Precision, ...] = (
    Precision.FP32,
    Precision.BF16,
    Precision.FP16,
    Precision.INT8,
    Precision.NF4,
    Precision.FP4,
    Precision.GPTQ,
    Precision.AWQ,
    Precision.FP8,
)
assert set(_ORDER) == set(Precision) == set(PRECISIONS)


def precision_info(precision: Precision | str, field: str = "precision") -> PrecisionFacts:
    """The facts of ``precision`` (a name is parsed: InvalidArgument naming ``field``)."""
    p = precision if isinstance(precision, Precision) else parse_precision(precision, field)
    return PRECISIONS[p]


def bits(precision: Precision | str) -> int:
    """Weight bits of ``precision``."""
    return precision_info(precision).bits


def is_8bit(precision: Precision | str) -> bool:
    """True for 8-bit weights (bitsandbytes LLM.int8())."""
    return precision_info(precision).is_8bit


def display_rank(precision: Precision | str) -> int:
    """Position of ``precision`` in tables and figures; unknown names sort last."""
    try:
        return precision_info(precision).display_rank
    except InvalidArgument:
        return len(_ORDER)


def by_display_order(precisions: Iterable[str]) -> list[str]:
    """``precisions`` without repeats, in display order (unknown names last, by name)."""
    return sorted(set(precisions), key=lambda p: (display_rank(p), p))
