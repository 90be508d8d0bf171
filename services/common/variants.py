"""Study vocabulary shared by every service: precisions and variants."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from services.common.errors import InvalidArgument

__all__ = ["Precision", "Variant", "parse_precision"]


class Precision(StrEnum):
    """The closed set of precisions a variant can have."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"
    GPTQ = "gptq"
    AWQ = "awq"
    # Weights in float8 e4m3 with a scale per output channel, activations per token, made
    # when the model loads (vLLM's ``fp8_per_channel`` online quantization).
    FP8 = "fp8"

    @property
    def is_quantized(self) -> bool:
        return self not in (Precision.FP32, Precision.BF16, Precision.FP16)


def parse_precision(value: str, field: str = "precision") -> Precision:
    """Parse a precision name, raising InvalidArgument naming ``field`` when unknown."""
    try:
        return Precision(value.strip().lower())
    except ValueError:
        allowed = " ".join(p.value for p in Precision)
        raise InvalidArgument(
            field, f"unknown precision {value!r} (expected one of: {allowed})"
        ) from None


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, order=True)
class Variant:
    """One model at one precision: ``smollm2-135m@nf4``."""

    model: str
    precision: Precision

    def __str__(self) -> str:
        return f"{self.model}@{self.precision.value}"

    @classmethod
    def parse(cls, value: str, field: str = "variant") -> Variant:
        model, sep, precision = value.partition("@")
        if not sep or not model:
            raise InvalidArgument(field, f"expected 'model@precision', got {value!r}")
        if not _MODEL_NAME.match(model):
            raise InvalidArgument(field, f"bad model name {model!r} (letters, digits, . _ -)")
        return cls(model, parse_precision(precision, field))
