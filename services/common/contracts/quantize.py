"""The ``quantize`` stage's contract: the request (the job's params) and the run's record.

The request is ``services.common.quantization.QuantizeRequest`` (the loader and the quantizer
share it to address checkpoints); the record is what the job writes once to
``runs/<run>/<model>@<method>/quantize/result.json`` and returns for its job record.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.common.quantization import QuantizeRequest

__all__ = ["QuantizeParams", "QuantizeResult"]

QuantizeParams = QuantizeRequest
"""A quantize job's params are its request."""


class QuantizeResult(BaseModel):
    """``quantize/result.json`` of a gptq/awq variant."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    checkpoint: str = Field(description="Content address of the checkpoint (quantized/<id>/).")
    manifest_key: str
    reused: bool = Field(description="True when the checkpoint existed (no quantization ran).")
    method: str | None = None
    settings: dict[str, Any] | None = None
    calibration: dict[str, Any] = Field(default_factory=dict)
    quantize_seconds: float | None = None
    job_seconds: float
    size_bytes: int
    files: int
    libraries: dict[str, Any] = Field(default_factory=dict)
    from_: str | None = Field(
        default=None, alias="from", description="'local cache' when committed from the cache."
    )
    run_id: str
    variant: str
    model: str
    source: str
    calibration_request: dict[str, Any]
    result_key: str
