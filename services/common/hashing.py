"""Stable content hashes: the same logical value always gives the same id."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["canonical_json", "stable_hash"]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace (the hashing form)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(value: Any, length: int = 16) -> str:
    """Hex sha256 of the canonical JSON of ``value``, truncated to ``length`` characters."""
    digest = hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
    return digest[:length]
