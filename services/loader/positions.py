"""Token-position selectors: parse ``prompt[-1]``-style syntax and select token indices."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from services.common.errors import InvalidArgument

__all__ = ["POSITION_SYNTAX", "Position", "parse_position"]

POSITION_SYNTAX = "prompt[-1], prompt[:], response[:], response[:k], response[-1], all"

_PATTERN = re.compile(r"^(prompt|response)\[(-1|:|:(\d+))\]$")


@dataclass(frozen=True)
class Position:
    """Which tokens of an item to read: a segment and a slice of it."""

    segment: Literal["prompt", "response", "all"]
    select: Literal["last", "all", "first"]
    k: int = 0

    def __str__(self) -> str:
        if self.segment == "all":
            return "all"
        inner = {"last": "-1", "all": ":", "first": f":{self.k}"}[self.select]
        return f"{self.segment}[{inner}]"

    @property
    def needs_response(self) -> bool:
        return self.segment == "response"

    def span(self, prompt_len: int, response_len: int) -> tuple[int, int]:
        """Half-open token range ``[start, end)`` within the item (prompt tokens come first)."""
        if self.segment == "all":
            return 0, prompt_len + response_len
        if self.segment == "prompt":
            return (prompt_len - 1, prompt_len) if self.select == "last" else (0, prompt_len)
        start = prompt_len
        if self.select == "last":
            return start + response_len - 1, start + response_len
        if self.select == "first":
            return start, start + min(self.k, response_len)
        return start, start + response_len


def parse_position(text: str, field: str = "position") -> Position:
    """Parse the position syntax; InvalidArgument naming ``field`` on anything else."""
    value = text.strip().replace(" ", "")
    if value == "all":
        return Position("all", "all")
    match = _PATTERN.match(value)
    if not match:
        raise InvalidArgument(field, f"bad position {text!r}; expected one of: {POSITION_SYNTAX}")
    segment = match.group(1)
    inner = match.group(2)
    if inner == "-1":
        return Position(segment, "last")  # type: ignore[arg-type]
    if inner == ":":
        return Position(segment, "all")  # type: ignore[arg-type]
    if segment != "response":
        raise InvalidArgument(field, f"bad position {text!r}; [:k] applies to response only")
    k = int(match.group(3))
    if k < 1:
        raise InvalidArgument(field, f"bad position {text!r}; k must be at least 1")
    return Position("response", "first", k)
