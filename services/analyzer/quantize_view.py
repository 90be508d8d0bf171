"""How each gptq/awq variant's checkpoint was made and served, for the report's quantization section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.analyzer.views import finite_or_none, int_or_none

__all__ = ["QuantizeView", "parse_quantize"]


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    if value is None or value == "" or value == "unknown":
        return None
    return str(value)


@dataclass(frozen=True)
class QuantizeView:
    """How a gptq/awq variant's checkpoint was made and served.

    Read from the quantize job's ``result.json`` (``services.quantizer.handler.record_result``:
    ``method``, ``settings {bits, group_size, sym, desc_act}``, ``checkpoint``, ``reused``,
    ``from``, ``calibration {name, sha256, bytes, samples, tokens}``, ``quantize_seconds``,
    ``libraries.gptqmodel``) and from the loader's ``Info.quantization_config`` recorded in
    the variant's extraction summaries (``kernel``, ``compute_dtype``, ``made_by``, and the
    same settings and calibration fields, the only source for a published checkpoint).
    ``key`` is the ``result.json`` read, None when only the loader's record exists.
    """

    variant: str
    key: str | None
    method: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    desc_act: bool | None = None
    checkpoint: str | None = None
    made_by: str = "unknown"  # "platform", "published" or "unknown"
    calibration_source: str | None = None
    calibration_sha256: str | None = None
    calibration_bytes: int | None = None
    calibration_samples: int | None = None
    calibration_tokens: int | None = None
    quantize_seconds: float | None = None
    reused: bool | None = None
    reused_from: str | None = None
    gptqmodel: str | None = None
    kernel: str | None = None
    compute_dtype: str | None = None
    loader_source: str | None = None  # the summary.json the loader fields came from


def parse_quantize(
    raw: Mapping[str, Any] | None,
    loader: Mapping[str, Any] | None,
    *,
    variant: str,
    key: str | None,
    loader_source: str | None = None,
) -> QuantizeView:
    """One variant's :class:`QuantizeView` from its quantize result and/or its loader's Info."""
    result = raw or {}
    loader = loader or {}
    qc = loader.get("quantization_config")
    qc = qc if isinstance(qc, Mapping) else {}
    settings = result.get("settings")
    settings = settings if isinstance(settings, Mapping) else {}
    cal = result.get("calibration")
    cal = cal if isinstance(cal, Mapping) else {}
    libraries = result.get("libraries")
    libraries = libraries if isinstance(libraries, Mapping) else {}
    made_by = str(qc.get("made_by", ""))
    if raw is not None or made_by == "qsens quantize job":
        origin = "platform"
    elif made_by == "published checkpoint":
        origin = "published"
    else:
        origin = "unknown"

    def setting(name: str) -> Any:
        return settings[name] if name in settings else qc.get(name)

    method = str(result.get("method") or qc.get("method") or variant.rpartition("@")[2])
    return QuantizeView(
        variant=variant,
        key=key,
        method=method,
        bits=int_or_none(setting("bits")),
        group_size=int_or_none(setting("group_size")),
        sym=_bool(setting("sym")),
        desc_act=_bool(setting("desc_act")) if method == "gptq" else None,  # GPTQ's alone
        checkpoint=_str(result.get("checkpoint") or qc.get("checkpoint")),
        made_by=origin,
        calibration_source=_str(cal.get("name")),
        calibration_sha256=_str(cal.get("sha256") or qc.get("calibration_sha256")),
        calibration_bytes=int_or_none(cal.get("bytes")),
        calibration_samples=int_or_none(cal.get("samples") or qc.get("calibration_samples")),
        calibration_tokens=int_or_none(cal.get("tokens") or qc.get("calibration_tokens")),
        quantize_seconds=finite_or_none(result.get("quantize_seconds")),
        reused=_bool(result.get("reused")),
        reused_from=_str(result.get("from")),
        gptqmodel=_str(libraries.get("gptqmodel") or qc.get("quantizer")),
        kernel=_str(qc.get("kernel")),
        compute_dtype=_str(qc.get("compute_dtype") or loader.get("dtype")),
        loader_source=loader_source if qc else None,
    )
