"""Surface statistics of an answer that show degenerate generation: repetition and structure.

``repetition`` is 100 x (1 - the share of repeated word 4-grams): a fluent paragraph repeats
almost none, a generation stuck in a loop repeats nearly all. ``structure`` multiplies three
factors: the share of letters among non-space characters (symbol soup scores low), the
longest run of one character, and the longest "word". Both are 0-100, higher is healthier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TextStats", "text_stats"]

_TOKEN = re.compile(r"\w+|[^\w\s]")
_NGRAM = 4
_RUN_FREE = 9  # runs up to this length ("---------", "........") are ordinary markup
_RUN_ZERO = 40  # a run this long zeroes the factor
_WORD_FREE = 40  # longer "words" are glued junk (URLs aside, rare in answers)


@dataclass(frozen=True)
class TextStats:
    """Repetition and structure signals of one text, each 0-100 (100 = healthy)."""

    tokens: int
    repeated_ngram_share: float
    letter_share: float
    longest_char_run: int
    longest_word: int
    repetition: float
    structure: float


def _longest_run(text: str) -> int:
    best = run = 0
    prev = ""
    for ch in text:
        if ch.isspace():
            prev, run = "", 0
            continue
        run = run + 1 if ch == prev else 1
        prev = ch
        best = max(best, run)
    return best


def text_stats(text: str) -> TextStats:
    """Compute the repetition and structure signals of ``text``."""
    tokens = _TOKEN.findall(text.lower())
    grams = [tuple(tokens[i : i + _NGRAM]) for i in range(len(tokens) - _NGRAM + 1)]
    repeated = (1.0 - len(set(grams)) / len(grams)) if grams else 0.0
    visible = [ch for ch in text if not ch.isspace()]
    letters = sum(ch.isalpha() for ch in visible)
    letter_share = letters / len(visible) if visible else 0.0
    run = _longest_run(text)
    longest_word = max((len(w) for w in text.split()), default=0)

    letter_factor = min(1.0, max(0.0, (letter_share - 0.3) / 0.3))
    run_factor = (
        1.0 if run <= _RUN_FREE else max(0.0, 1.0 - (run - _RUN_FREE) / (_RUN_ZERO - _RUN_FREE))
    )
    word_factor = 1.0 if longest_word <= _WORD_FREE else 0.5
    structure = 100.0 * letter_factor * run_factor * word_factor if visible else 0.0
    return TextStats(
        tokens=len(tokens),
        repeated_ngram_share=repeated,
        letter_share=letter_share,
        longest_char_run=run,
        longest_word=longest_word,
        repetition=100.0 * (1.0 - repeated) if tokens else 0.0,
        structure=structure,
    )
