"""From the judge's first-token log-prob table to a score, REFUSAL, or unscorable.

As in the persona-vectors paper (Chen et al. 2025), the score is the probability-weighted mean
of the integers 0-100 among the first output token's ``top_logprobs``:

    score = sum_n p(n) * n / sum_n p(n),   p(n) = exp(logprob), n an integer token in [0, 100]

Parsing is strict: a token counts as the integer ``n`` only when, after dropping surrounding
whitespace, it is exactly ``n`` written canonically (``"85"``, ``" 85"``, ``"0"``, ``"100"``);
``"85abc"``, ``"085"``, ``"+85"``, ``"8_5"``, ``"85.0"``, ``"eighty"`` and ``"101"`` do not
count. Tokens that spell the same number (``"85"`` and ``" 85"``) add up.

A token counts toward REFUSAL when, stripped, it is at least two characters long and a prefix
of ``REFUSAL`` in capitals (``"REF"``, ``" REFUS"``, ``"REFUSAL"``), since tokenizers split the
word. The rule, in order:

1. REFUSAL when the refusal mass exceeds the numeric mass and is at least ``min_mass``;
2. scored when the numeric mass is at least ``min_mass`` (default 0.25);
3. otherwise unscorable (``low_numeric_mass``), recorded with both masses, never a silent 0.

Rule 1 differs from persona-vectors, which scores every table whose numeric mass reaches 0.25
whatever else the judge wrote. ``refusal_over_score`` (default True, the setting
``QSENS_JUDGE_REFUSAL_OVER_SCORE``) keeps rule 1 for those contested tables; False scores them as
persona-vectors does (REFUSAL then needs a numeric mass below ``min_mass``). Either way
``Aggregate.contested`` marks a table where the choice decided the outcome (refusal mass above a
numeric mass of at least ``min_mass``), so the judge can report how many judgments it affected.

Tokenizers that split numbers into single digits (SmolLM2, Llama 2) only ever show 0-9 at the
first position, so their first-token scores live on 0-9: host such a judge on a loader and use
the ``loader`` backend, which builds the same table from whole answers (``"57"`` then
end-of-turn) scored as sequences (``services.judge.backends.loader_backend``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from services.judge.models import JudgeStatus, Reason

__all__ = [
    "DEFAULT_MIN_MASS",
    "REFUSAL_WORD",
    "Aggregate",
    "aggregate",
    "is_refusal_token",
    "parse_score_token",
]

DEFAULT_MIN_MASS = 0.25
REFUSAL_WORD = "REFUSAL"
_INTEGER = re.compile(r"(?:0|[1-9][0-9]?|100)")


@dataclass(frozen=True)
class Aggregate:
    """The outcome of one log-prob table."""

    status: JudgeStatus
    score: float | None
    numeric_mass: float
    refusal_mass: float
    reason: Reason | None = None
    detail: str | None = None
    contested: bool = False  # refusal mass > numeric mass >= min_mass: the option decided it


def parse_score_token(token: str) -> int | None:
    """The integer 0-100 a token spells exactly (surrounding whitespace allowed), else None."""
    stripped = token.strip()
    # [0-9] rather than \d: other scripts' digits are not the judge's numbers.
    if _INTEGER.fullmatch(stripped) is None:
        return None
    return int(stripped)


def is_refusal_token(token: str) -> bool:
    """Whether a token is a (2+ character) start of ``REFUSAL``."""
    stripped = token.strip()
    return len(stripped) >= 2 and REFUSAL_WORD.startswith(stripped)


def aggregate(
    table: Iterable[tuple[str, float]],
    min_mass: float = DEFAULT_MIN_MASS,
    *,
    refusal_over_score: bool = True,
) -> Aggregate:
    """Score one first-token table of ``(token, logprob)`` pairs (see the module docstring)."""
    weighted = 0.0
    numeric = 0.0
    refusal = 0.0
    for token, logprob in table:
        if math.isnan(logprob) or logprob > 1e-6:
            raise ValueError(f"log-prob of {token!r} is {logprob}, not a log-probability")
        p = math.exp(min(logprob, 0.0))
        n = parse_score_token(token)
        if n is not None:
            numeric += p
            weighted += p * n
        elif is_refusal_token(token):
            refusal += p
    scorable = numeric >= min_mass and numeric > 0
    contested = scorable and refusal > numeric
    if refusal > numeric and refusal >= min_mass and (refusal_over_score or not scorable):
        return Aggregate(JudgeStatus.REFUSAL, None, numeric, refusal, contested=contested)
    if scorable:
        score = min(100.0, max(0.0, weighted / numeric))
        return Aggregate(JudgeStatus.SCORED, score, numeric, refusal, contested=contested)
    return Aggregate(
        JudgeStatus.UNSCORABLE,
        None,
        numeric,
        refusal,
        Reason.LOW_NUMERIC_MASS,
        f"numeric probability mass {numeric:.4f} < {min_mass} (refusal mass {refusal:.4f})",
    )
