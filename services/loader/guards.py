"""Cheap checks that keep hostile or overflowing requests from costing time or lying: a
prompt's length before tokenizing, steering strength before the model runs, and finite
numbers in every reply before it is returned as OK.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.loader.steering import SteerSpec

__all__ = [
    "MAX_ABLATE_COEFFICIENT",
    "MAX_STEER_NORM",
    "check_finite",
    "check_prompt_chars",
    "check_steering_strength",
    "max_prompt_chars",
    "non_finite_error",
]

# RMSNorm/LayerNorm square the residual stream in float32: a residual whose L2 norm nears
# sqrt(float32 max) ~ 1.8e19 makes the variance inf and every later number NaN. Steering
# offsets (their sum, per item) stay an order of magnitude below that.
MAX_STEER_NORM = 1e18
# Ablation subtracts coefficient x (projection on the direction): a residual norm of ~1e4 times
# this stays below MAX_STEER_NORM. Useful ablations use coefficients near 1.
MAX_ABLATE_COEFFICIENT = 1e12

# Characters per token assumed for an engine whose vocabulary cannot be listed.
FALLBACK_TOKEN_CHARS = 256

_longest_token: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def max_prompt_chars(engine: Any, max_tokens: int) -> int:
    """Most characters a text of at most ``max_tokens`` tokens can have for ``engine``.

    No token covers more characters than its longest vocabulary entry (byte-level entries
    spell one byte per character; a text character is at least one byte), so a longer text
    can never fit and is refused without running the tokenizer (which takes seconds on
    megabytes). An engine without a transformers tokenizer gets ``FALLBACK_TOKEN_CHARS``.
    """
    longest = _longest_token.get(engine)
    if longest is None:
        tokenizer = getattr(engine, "tokenizer", None)
        get_vocab = getattr(tokenizer, "get_vocab", None)
        vocab = get_vocab() if callable(get_vocab) else {}
        longest = max((len(str(t)) for t in vocab), default=FALLBACK_TOKEN_CHARS)
        _longest_token[engine] = longest
    return max_tokens * max(1, longest)


def check_prompt_chars(engine: Any, max_tokens: int, texts: Iterable[str], field: str) -> None:
    """InvalidArgument naming ``field`` when ``texts`` together cannot fit ``max_tokens``."""
    limit = max_prompt_chars(engine, max_tokens)
    total = 0
    for text in texts:
        total += len(text)
        if total > limit:
            raise InvalidArgument(
                field,
                f"over {limit} characters: more than the loader's limit of {max_tokens} "
                "tokens per item",
            )


def _float_limit(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if dtype.is_floating_point else math.inf


def check_steering_strength(
    specs: Sequence[tuple[str, SteerSpec]], compute_dtype: torch.dtype
) -> None:
    """Refuse steering whose coefficient x vector would overflow the model's arithmetic.

    ``specs`` are every spec one item runs with, each with its field path. An added offset
    must fit the compute dtype element-wise, and the added offsets together (their norms
    times the layers each is added at, summed: a bound on what they add to the residual
    stream by any layer) must stay below ``MAX_STEER_NORM``.
    """
    element_limit = min(_float_limit(compute_dtype), _float_limit(torch.float32))
    total = 0.0
    for field, spec in specs:
        coefficient = abs(spec.coefficient)
        if spec.mode == "ablate":
            if coefficient > MAX_ABLATE_COEFFICIENT:
                raise InvalidArgument(
                    f"{field}.coefficient",
                    f"|{spec.coefficient:g}| exceeds {MAX_ABLATE_COEFFICIENT:g} for ablation",
                )
            continue
        vector = spec.vector.to(torch.float64)
        peak = coefficient * float(vector.abs().max()) if vector.numel() else 0.0
        norm = coefficient * float(torch.linalg.vector_norm(vector))
        if not peak <= element_limit:
            raise InvalidArgument(
                f"{field}.coefficient",
                f"coefficient x vector reaches {peak:.3g}, beyond the largest "
                f"{str(compute_dtype).removeprefix('torch.')} value ({element_limit:.3g}); "
                "lower the coefficient or normalise the vector",
            )
        total += norm * max(1, len(spec.layers))
        if not total <= MAX_STEER_NORM:
            raise InvalidArgument(
                f"{field}.coefficient",
                f"coefficient x vector has norm {norm:.3g} (all offsets of the item together "
                f"{total:.3g}), above {MAX_STEER_NORM:g}: the model's normalisation would "
                "overflow float32; lower the coefficient or normalise the vector",
            )


def non_finite_error(what: str, item_field: str, steered: bool) -> Exception:
    """The error for non-finite numbers in a reply: the steering's fault, or the model's."""
    if steered:
        return InvalidArgument(
            f"{item_field}.steering",
            f"the model's {what} became non-finite (NaN/inf) under this steering; "
            "lower the coefficient",
        )
    return FailedPrecondition(
        f"{item_field}: the model produced non-finite {what} (NaN/inf) for this input; "
        "this variant's arithmetic overflows"
    )


def check_finite(
    values: Iterable[float] | torch.Tensor, what: str, item_field: str, steered: bool
) -> None:
    """Raise ``non_finite_error`` when any of ``values`` is NaN or infinite."""
    if isinstance(values, torch.Tensor):
        ok = bool(torch.isfinite(values).all()) if values.is_floating_point() else True
    else:
        ok = all(math.isfinite(v) for v in values)
    if not ok:
        raise non_finite_error(what, item_field, steered)
