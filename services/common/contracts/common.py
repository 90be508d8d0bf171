"""Pieces every stage contract shares: the params base, the trait reference, intervals.

A job's params are validated on arrival with ``parse_params``: a malformed job raises
``InvalidArgument`` naming the offending field (``params.steering.search.steps``) and is
dead-lettered, never retried.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import InvalidArgument
from services.common.methodologies import Methodology

__all__ = [
    "DEFAULT_LEVEL",
    "Interval",
    "Params",
    "Slope",
    "TraitParams",
    "VectorMode",
    "parse_params",
]

DEFAULT_LEVEL = 0.95

VectorMode = Literal["native", "replay", "reverse"]
"""``native``: a variant's own responses; ``replay``: the reference's, byte for byte;
``reverse``: the reference model on another variant's own responses (``replay_from`` names it),
the fourth cell of the 2x2 controlled replay (never steered with)."""

_P = TypeVar("_P", bound=BaseModel)


class Params(BaseModel):
    """Base of every job's params."""

    # Unknown keys are ignored: the planner may add context (model params) a kind does not use.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TraitParams(Params):
    """The trait as the planner passes it."""

    ref: str = Field(description="Built-in name or methodology:path for load_trait.")
    name: str = Field(description="<methodology>/<name>, used in keys.")
    methodology: Methodology


def _loc(loc: tuple[int | str, ...]) -> str:
    out = "params"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_params(model: type[_P], params: dict[str, Any]) -> _P:
    """Validate job params; InvalidArgument names the first bad field."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        loc = _loc(tuple(first["loc"]))
        key, sep, rest = message.partition(": ")
        if not first["loc"] and sep and key.isidentifier():
            # A whole-model check names its field first ("replay_from: ...").
            loc, message = f"{loc}.{key}", rest
        raise InvalidArgument(loc, message) from None


class Interval(BaseModel):
    """An estimate with a confidence interval over ``n`` units (questions or items)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float | None = Field(description="Point estimate (None when n is 0).")
    low: float | None = Field(description="Lower bound (None when n is 0).")
    high: float | None = Field(description="Upper bound (None when n is 0).")
    n: int = Field(ge=0, description="Units the estimate rests on.")
    level: float = Field(DEFAULT_LEVEL, description="Confidence level.")
    method: str = Field(description="percentile-bootstrap, wilson, or exact (n = 1).")


class Slope(BaseModel):
    """Least-squares slope of values on x, with a bootstrap interval over units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float | None
    low: float | None
    high: float | None
    intercept: float | None
    r2: float | None = Field(description="Coefficient of determination of the pooled fit.")
    n: int = Field(ge=0, description="Units (questions) with a value at every x.")
    level: float = DEFAULT_LEVEL
