"""The keyword a model's ``forward`` takes its KV cache by: ``cache`` or ``past_key_values``.

transformers 5.x renamed ``past_key_values`` to ``cache`` on model forwards; the old name
warns now and is removed in 5.40. Architectures move at their own pace, so the name is read
from the forward's signature (the deprecation wrapper exposes the new one) once per class.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

__all__ = ["cache_kwargs"]


@cache
def _takes_cache(forward: Any) -> bool:
    try:
        return "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the older name
        return False


def cache_kwargs(module: Any, kv_cache: Any) -> dict[str, Any]:
    """``{"cache": kv_cache}`` where ``module``'s forward takes it, else ``past_key_values``."""
    name = "cache" if _takes_cache(type(module).forward) else "past_key_values"
    return {name: kv_cache}
