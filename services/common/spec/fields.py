"""Limits, name checks and field types shared by the spec's sections."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

from services.common.methodologies import METHODOLOGIES

__all__ = [
    "DEFAULT_POSITIONS",
    "MAX_DEPTH",
    "MAX_LAYER",
    "MAX_SEED",
    "MAX_SPEC_BYTES",
    "METHODS",
    "Layer",
    "Seed",
    "UniqueLayers",
]

METHODS = ("mean_diff", "probe", "pca")
DEFAULT_POSITIONS: dict[str, str] = {m: f.default_position for m, f in METHODOLOGIES.items()}
_POSITION = re.compile(
    r"^(all|prompt\[-1\]|prompt\[:\]|response\[:\]|response\[:[1-9]\d{0,5}\]|response\[-1\])$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SUBKEY = re.compile(r"^[a-z_]+: ")

#: A spec names its data (trait, benchmark, calibration files); it never holds it, so anything
#: larger is a mistake, and every job record (the analyze job carries the whole spec) must fit
#: in one NATS message.
MAX_SPEC_BYTES = 256 * 1024
#: Deepest YAML nesting a spec may have (a real one is under 10 levels).
MAX_DEPTH = 64
#: Layer indices beyond this are refused even when the model's layer count is not known here.
MAX_LAYER = 4096
#: Seeds feed numpy, torch and the loader's uint64 sampling seed.
MAX_SEED = 2**63 - 1

_T = TypeVar("_T")


def _check_name(value: str) -> str:
    if not _NAME.match(value) or ".." in value:
        raise ValueError("letters, digits, '.', '_' or '-' (at most 64), no '..'")
    return value


def _no_duplicates(values: list[_T]) -> list[_T]:
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        key = json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else v
        if key in seen:
            shown = getattr(v, "value", v)
            raise ValueError(f"{shown} is listed twice (items {seen[key]} and {i})")
        seen[key] = i
    return values


# Strict: lax mode would read `true` as layer 1 (and then report a duplicate, not the bool).
Layer = Annotated[int, Strict(), Field(ge=-MAX_LAYER, lt=MAX_LAYER)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
UniqueLayers = Annotated[list[Layer], AfterValidator(_no_duplicates)]


class _Strict(BaseModel):
    # allow_inf_nan: NaN and infinities in coefficients or search settings only fail later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _first_repeat(values: Sequence[str], field: str, message: str) -> None:
    """ValueError naming the second of two equal ``values`` (``field`` formats its index)."""
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ValueError(f"{field.format(i)}: {message} ({value!r} is used twice)")
        seen.add(value)


def _check_trait_name(name: str, field: str) -> None:
    """A trait name is ``<methodology>/<name>``: two key parts (results live under both)."""
    parts = name.split("/")
    if len(parts) != 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
        raise ValueError(
            f"{field}: trait names look like <methodology>/<name> (e.g. pv/evil), each part "
            f"letters, digits, '.', '_' or '-' without '..', got {name!r}"
        )
