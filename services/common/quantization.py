"""Platform quantization: GPTQ/AWQ settings, the calibration reference, and checkpoint addresses.

One module shared by the spec, the planner, the quantize job and the loader, so that the job
that makes a checkpoint and the loader that waits for it compute the same S3 address from the
same request: ``quantized/<method>-w<bits>g<group>-<hash>/`` where the hash covers the model
source, the method's settings, the calibration sampling and the calibration set's sha256 (its
content, not its name). ``manifest.json`` under that prefix is written last and is the only
proof that a checkpoint exists (see ``services.quantizer.checkpoint``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.errors import InvalidArgument
from services.common.hashing import stable_hash

__all__ = [
    "BUILTIN_CALIBRATION",
    "CHECKPOINT_FORMAT",
    "QUANT_METHODS",
    "AWQSettings",
    "CalibrationSpec",
    "GPTQSettings",
    "QuantizeRequest",
    "QuantizeSpec",
    "checkpoint_id",
    "checkpoint_prefix",
    "manifest_key",
    "parse_request",
]

QUANT_METHODS = ("gptq", "awq")
BUILTIN_CALIBRATION = "builtin"
CHECKPOINT_FORMAT = "qsens-quantized-checkpoint/1"
# Group sizes every kernel family accepts (-1: one group per row).
_GROUP_SIZES = (-1, 32, 64, 128, 256)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_group_size(value: int) -> int:
    if value not in _GROUP_SIZES:
        raise ValueError(f"group size {value} is not one of {', '.join(map(str, _GROUP_SIZES))}")
    return value


class GPTQSettings(_Strict):
    """GPTQ (Frantar et al. 2023) as done by gptqmodel."""

    bits: int = Field(4, description="Weight bits: 4 or 8.")
    group_size: int = Field(128, description="Columns sharing one scale (-1: whole row).")
    sym: bool = Field(True, description="Symmetric quantization (Marlin needs it on CUDA).")
    desc_act: bool = Field(False, description="Quantize columns by decreasing activation.")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian dampening.")

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError(f"gptq supports 4 or 8 bits, not {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        return _check_group_size(value)


class AWQSettings(_Strict):
    """AWQ (Lin et al. 2024) as done by gptqmodel, GEMM layout."""

    bits: int = Field(4, description="Weight bits: 4 only.")
    group_size: int = Field(128, description="Columns sharing one scale (-1: whole row).")
    sym: bool = Field(False, description="Symmetric; AWQ's default is a zero point (False).")

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value != 4:
            raise ValueError(f"awq supports 4 bits, not {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        return _check_group_size(value)


class CalibrationSpec(_Strict):
    """Which text calibrates, and how much of it (the same for every method of a study)."""

    source: str = Field(
        BUILTIN_CALIBRATION,
        description="'builtin' (shipped with qsens), a local .jsonl/.txt path, or "
        "s3://bucket/key (what `qsens data put` prints).",
    )
    samples: int = Field(128, ge=1, le=4096, description="Calibration sequences (at most).")
    seq_len: int = Field(512, ge=16, le=8192, description="Tokens per sequence (at most).")


class QuantizeSpec(_Strict):
    """Settings of platform quantization for the gptq and awq precisions of a study."""

    gptq: GPTQSettings = Field(default_factory=GPTQSettings)
    awq: AWQSettings = Field(default_factory=AWQSettings)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def request(self, model: str, source: str, method: str) -> QuantizeRequest:
        """The quantize request of ``method`` for one model."""
        settings = self.gptq if method == "gptq" else self.awq
        return QuantizeRequest(
            model=model,
            source=source,
            method=method,
            settings=settings.model_dump(mode="json"),
            calibration=self.calibration,
        )


class QuantizeRequest(_Strict):
    """What a quantize job makes and what a loader of a platform-quantized variant waits for."""

    model: str = Field(description="Model name (a label; not part of the address).")
    source: str = Field(description="Reference model source (hub id, folder, smollm2-135m...).")
    method: str = Field(description="gptq or awq.")
    settings: dict[str, Any] = Field(default_factory=dict, description="The method's settings.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in QUANT_METHODS:
            raise ValueError(
                f"unknown quantization method {value!r} (known: {', '.join(QUANT_METHODS)})"
            )
        return value

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        method = info.data.get("method")
        model: type[GPTQSettings | AWQSettings] = GPTQSettings if method == "gptq" else AWQSettings
        return model.model_validate(value).model_dump(mode="json")

    @property
    def typed_settings(self) -> GPTQSettings | AWQSettings:
        if self.method == "gptq":
            return GPTQSettings.model_validate(self.settings)
        return AWQSettings.model_validate(self.settings)

    def source_identity(self) -> str:
        """The source as it enters the address: SmolLM2's aliases are one model."""
        from services.loader.model_source import SMOLLM2_ALIASES

        text = self.source.strip()
        return SMOLLM2_ALIASES[0] if text.lower() in SMOLLM2_ALIASES else text


def checkpoint_id(request: QuantizeRequest, calibration_sha256: str) -> str:
    """``<method>-w<bits>g<group>-<hash>``: the content address of a quantized checkpoint."""
    s = request.typed_settings
    digest = stable_hash(
        {
            "format": CHECKPOINT_FORMAT,
            "source": request.source_identity(),
            "method": request.method,
            "settings": s.model_dump(mode="json"),
            "calibration": {
                "sha256": calibration_sha256,
                "samples": request.calibration.samples,
                "seq_len": request.calibration.seq_len,
            },
        },
        20,
    )
    group = "row" if s.group_size == -1 else str(s.group_size)
    return f"{request.method}-w{s.bits}g{group}-{digest}"


def checkpoint_prefix(checkpoint: str) -> str:
    """``quantized/<checkpoint id>/``: outside ``runs/``, so every run and study reuses it."""
    return f"quantized/{checkpoint}/"


def manifest_key(checkpoint: str) -> str:
    """The commit marker of a checkpoint: written last, after every file it lists."""
    return checkpoint_prefix(checkpoint) + "manifest.json"


def parse_request(data: Any, field: str = "params") -> QuantizeRequest:
    """Validate a quantize request; InvalidArgument names the offending key."""
    if isinstance(data, QuantizeRequest):
        return data
    try:
        return QuantizeRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", err)).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unknown key"
        raise InvalidArgument(f"{field}.{loc}" if loc else field, message) from None
