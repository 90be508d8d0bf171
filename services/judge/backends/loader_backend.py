"""The ``loader`` backend: any loader-hosted model judges, by scoring the rubric's integers as
sequences.

The first-token method (``openai`` backend, ``services.judge.aggregate``) reads one token's
top log-probs and so needs a tokenizer with the integers 0-100 as single tokens. Tokenizers
that split numbers (SmolLM2 and Llama 2 into digits) would only ever show 0-9 there. Here every
integer ``n`` in 0..100 is scored as the whole answer instead:

    p(n) = P(canonical tokens of "n", then end-of-turn | judge prompt in the chat template)

through the loader's ``Score`` RPC: one context (the judge prompt rendered with the hosted
model's chat template and its generation prompt) with 102 continuations (``"0<eot>"`` ..
``"100<eot>"`` and ``"REFUSAL<eot>"``), so the loader prefills the prompt once and scores the
continuations from its cache, as one token tree of their ~105 distinct prefixes
(``services.loader.engines.hf.score``). Ending each continuation with the end-of-turn token
keeps ``"5"`` from absorbing the mass of ``"57"``: the 101 numbers are then disjoint complete
answers. The table ``[("0", log p(0)), ..., ("REFUSAL", ...)]`` goes through the same
``aggregate`` as first-token tables: the score is ``sum p(n) n / sum p(n)``, REFUSAL and the
``min_numeric_mass`` rule are unchanged. The numeric mass here is the probability that the
model's whole answer is a bare integer, which a small model gives far less often than a large
one: lower ``min_numeric_mass`` for such judges, and read the mass recorded with every verdict.

Each judgment is one Score call (a micro-batch's calls are sent one after another), at low
priority like the embedding backend's perplexity calls, so a judge that shares the study's
loader never delays the study. One call per judgment rather than per micro-batch bounds a
call's memory where the engine cannot run the tree (another attention kernel, a model over
several devices) and expands the prompt's KV cache to the 102 continuations instead: about 102
x the prompt's positions (1.3 GB for SmolLM2-135M at float32 and a 270-token prompt).

The end-of-turn token is ``QSENS_JUDGE_END_OF_TURN`` or, by default, the first of the common
chat templates' end tokens that the hosted tokenizer has as one token.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument, QsensError
from services.common.logging import get_logger
from services.common.settings import JudgeSettings
from services.judge.aggregate import REFUSAL_WORD
from services.judge.backends.base import JudgeBackend, WorkItem
from services.judge.metrics import judge_metrics
from services.judge.models import JudgeStatus, Reason, Rubric, Verdict
from services.judge.rubrics import render_prompt
from services.loader.client import Chat, LoaderClient, PromptItem, ScoreItem

__all__ = ["END_OF_TURN_CANDIDATES", "SCALE", "LoaderJudgeBackend", "check_numeric_scale"]

log = get_logger(__name__)

SCORING_VERSION = "sequence-v1"
SCALE = range(0, 101)
# End-of-turn tokens of common chat templates, then plain end-of-text tokens (no template).
END_OF_TURN_CANDIDATES = (
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
)
# "0 ... 100" on one line ("from 0 to 100", "0-100", "between 0 and 100").
_SCALE_TEXT = re.compile(r"(?<![\d.])0(?![\d.])[^\n]{0,80}?(?<![\d.])100(?![\d.])")
_TABLE_KEEP = 20  # alternatives kept in the verdict, as the first-token table's top_logprobs


def check_numeric_scale(rubric: Rubric, field: str) -> None:
    """InvalidArgument unless the rubric's prompt asks for a number on the 0-100 scale, the
    only answers this backend scores."""
    if _SCALE_TEXT.search(rubric.eval_prompt) is None:
        raise InvalidArgument(
            field,
            "the loader judge scores the integers 0..100; the prompt names no 0-100 scale "
            "(e.g. 'a number from 0 to 100')",
        )


class LoaderJudgeBackend(JudgeBackend):
    """Sequence log-likelihood judge on a loader-hosted model (module docstring)."""

    name = "loader"

    def __init__(self, settings: JudgeSettings, *, loader: LoaderClient | None = None) -> None:
        super().__init__()
        self.settings = settings
        self._loader = loader
        self._variant = settings.variant or ""
        self._end = settings.end_of_turn or ""
        self._chat = True
        self._start_lock = asyncio.Lock()
        self._started = False
        self._metrics = judge_metrics()

    @property
    def model(self) -> str:
        return f"loader:{self._variant}"

    @property
    def end_of_turn(self) -> str:
        return self._end

    def identity(self) -> dict[str, Any]:
        return {
            "scoring": SCORING_VERSION,
            "end_of_turn": self._end,
            "chat_template": self._chat,
            "min_numeric_mass": self.settings.min_numeric_mass,
            "refusal_over_score": self.settings.refusal_over_score,
            "max_answer_chars": self.settings.max_answer_chars,
        }

    def check_rubric(self, rubric: Rubric, field: str) -> None:
        check_numeric_scale(rubric, field)

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            address = self.settings.loader_address
            if self._loader is None:
                if not address:
                    raise FailedPrecondition(
                        "judge: the loader backend needs a loader (--loader-address or "
                        "QSENS_JUDGE_LOADER_ADDRESS)"
                    )
                self._loader = LoaderClient(
                    address,
                    timeout_s=self.settings.loader_timeout_s,
                    wait_s=self.settings.loader_wait_s,
                    max_message_bytes=64 * 1024 * 1024,
                    priority="low",  # the study's own calls go first
                )
            loader = self._loader
            try:
                info = await loader.info()
            except QsensError as exc:
                await self.close()
                raise FailedPrecondition(
                    f"judge: the loader at {loader.address} is unreachable: {exc}"
                ) from None
            want = self.settings.variant
            if want and info.variant != want:
                await self.close()
                raise FailedPrecondition(
                    f"judge: variant {want!r} is not served at {loader.address} "
                    f"(it serves {info.variant!r}); point the judge at that variant's loader"
                )
            self._variant = info.variant
            self._chat = info.supports_chat_template
            if not self._end:
                self._end = await self._find_end_of_turn(loader)
            self._started = True

    async def _find_end_of_turn(self, loader: LoaderClient) -> str:
        """The first candidate end token the hosted tokenizer has as exactly one token."""
        for candidate in END_OF_TURN_CANDIDATES:
            try:
                await loader.next_token(
                    [PromptItem(self._context("hi"))], top_k=1, token_strings=[candidate]
                )
            except InvalidArgument:
                continue
            return candidate
        await self.close()
        raise FailedPrecondition(
            f"judge: the model at {loader.address} has none of the end-of-turn tokens "
            f"{', '.join(END_OF_TURN_CANDIDATES)} as one token; set QSENS_JUDGE_END_OF_TURN"
        )

    async def close(self) -> None:
        if self._loader is not None:
            await self._loader.close()
            self._loader = None
        self._started = False

    def _context(self, prompt: str) -> Chat | str:
        return Chat.of([("user", prompt)]) if self._chat else prompt + "\n\n"

    def continuations(self) -> list[str]:
        """The scored answers: each integer of the scale, then REFUSAL, each closing the turn."""
        return [f"{n}{self._end}" for n in SCALE] + [f"{REFUSAL_WORD}{self._end}"]

    async def score_batch(self, batch: Sequence[WorkItem]) -> list[Verdict]:
        await self.start()
        assert self._loader is not None
        self.stats.batches += 1
        self.stats.items += len(batch)
        conts = self.continuations()
        items = [
            ScoreItem(
                self._context(
                    render_prompt(
                        w.rubric.eval_prompt, w.question, w.answer, self.settings.max_answer_chars
                    )
                ),
                conts,
            )
            for w in batch
        ]
        verdicts: list[Verdict] = []
        for item in items:
            # One after another: the loader runs one pass at a time anyway, and a burst of
            # low-priority calls would only meet its back-pressure.
            self.stats.upstream_calls += 1
            try:
                (scores,) = await self._loader.score([item])
            except Exception as exc:  # a failed call fails its item, retryably, never the job
                verdicts.append(self._failed(exc))
                continue
            self.stats.count("ok")
            verdicts.append(self._verdict([c.logprob for c in scores]))
        return verdicts

    def _failed(self, exc: Exception) -> Verdict:
        log.warning("judge Score failed: %r", exc, extra={"backend": self.name})
        self.stats.count("upstream_error")
        self._metrics.errors.labels(self.name, Reason.UPSTREAM_ERROR.value).inc()
        return Verdict(
            status=JudgeStatus.UNSCORABLE,
            reason=Reason.UPSTREAM_ERROR,
            detail=f"loader Score failed: {type(exc).__name__}: {exc}"[:2000],
            retryable=True,
        )

    def _verdict(self, logprobs: Sequence[float]) -> Verdict:
        labels = [str(n) for n in SCALE] + [REFUSAL_WORD]
        # Float rounding can put a near-certain answer a hair above 0.
        table = [(label, min(0.0, lp)) for label, lp in zip(labels, logprobs, strict=True)]
        top = sorted(table, key=lambda t: t[1], reverse=True)[:_TABLE_KEEP]
        return self.table_verdict(table, self.settings, top)
