"""Evaluate many steering settings at once: one generate call, one judge call, per-setting means.

Each setting (layers, coefficient, vector, add|ablate) becomes ``len(questions)`` rows that
carry their own steering, so the loader runs every setting of a search step in one batched
request (``Generate`` with per-row steering and a shared vector table), and the judge scores
every answer for the trait and for coherence in one request. ``per_setting=True`` sends one
generate call and one judge call per setting instead: the protocol this replaces, kept for the
benchmark.

Judge verdicts are mapped to the numbers that enter the means: a score is used as is; a
REFUSAL counts as 100 on a refusal trait (refusing *is* the trait) and is left out, and
counted, on any other trait; an unscorable verdict is always left out and counted, never 0.
Every verdict must come from the judge backend the job asked for (and, for the openai backend,
the judge model), else the job fails with ``FailedPrecondition``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from services.common.contracts.steer_results import Answer, JudgeProvenance, RunStats, Verdict
from services.common.errors import FailedPrecondition
from services.common.methodologies import SteerPositions
from services.judge.client import JudgeClient
from services.judge.models import COHERENCE, JudgeItem, JudgeResult, JudgeStatus, Rubric
from services.judge.rubrics import coherence_rubric, rubric_hash
from services.loader.client import Chat, Generation, LoaderClient, PromptItem, Steer
from services.steerer.context import add_calls, no_calls

__all__ = [
    "UNSTEERED",
    "Evaluation",
    "Setting",
    "SteeringEvaluator",
    "run_stats",
    "to_verdict",
]


@dataclass(frozen=True)
class Setting:
    """One intervention applied to every question (``coefficient`` 0: unsteered)."""

    layers: tuple[int, ...]
    coefficient: float
    vector_index: int = 0
    mode: Literal["add", "ablate"] = "add"
    positions: SteerPositions = "all"  # the methodology's (``MethodologyFacts.steer_positions``)

    def steering(self) -> list[Steer]:
        if self.coefficient == 0.0 or not self.layers:
            return []
        return [
            Steer(
                layers=list(self.layers),
                coefficient=self.coefficient,
                vector_ref=self.vector_index,
                mode=self.mode,
                positions=self.positions,
            )
        ]


UNSTEERED = Setting(layers=(), coefficient=0.0)


@dataclass
class Evaluation:
    """The answers to every question under one setting, with their statistics."""

    setting: Setting
    answers: list[Answer]
    stats: RunStats
    trait_values: list[float | None] = field(default_factory=list)
    coherence_ok: bool = False
    eligible: bool = False


def to_verdict(result: JudgeResult, *, refusal_is_trait: bool) -> Verdict:
    """Map a judge result to a verdict and the value it contributes to the mean."""
    used: float | None = None
    if result.status is JudgeStatus.SCORED and result.score is not None:
        used = float(result.score)
    elif result.status is JudgeStatus.REFUSAL and refusal_is_trait:
        used = 100.0
    return Verdict(
        score=result.score,
        status=result.status.value,
        reason=result.reason.value if result.reason is not None else None,
        used=used,
    )


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs else None


def run_stats(answers: Sequence[Answer]) -> RunStats:
    """Means over the answers' used values and the counts of what was left out."""
    trait = [a.trait.used for a in answers]
    coherence = [a.coherence.used for a in answers]
    return RunStats(
        mean_trait=_mean(trait),
        mean_coherence=_mean(coherence),
        n=len(answers),
        n_trait_scored=sum(v is not None for v in trait),
        n_coherence_scored=sum(v is not None for v in coherence),
        n_refusal=sum(a.trait.status == "refusal" for a in answers),
        n_unscorable_trait=sum(a.trait.status == "unscorable" for a in answers),
        n_unscorable_coherence=sum(a.coherence.used is None for a in answers),
    )


class SteeringEvaluator:
    """Generates and judges answers to a fixed question set under many settings."""

    def __init__(
        self,
        loader: LoaderClient,
        judge: JudgeClient,
        *,
        questions: Sequence[str],
        trait: str,
        rubric: Rubric,
        max_new_tokens: int,
        seed: int,
        expected_backend: str,
        expected_model: str | None = None,
        refusal_is_trait: bool = False,
        min_scored_fraction: float = 0.5,
        per_setting: bool = False,
        question_set: str = "eval",
    ) -> None:
        if not questions:
            raise FailedPrecondition("no questions to evaluate steering on")
        self.loader = loader
        self.judge = judge
        self.questions = list(questions)
        self.trait = trait
        self.rubric = rubric
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.expected_backend = expected_backend
        self.expected_model = expected_model
        self.refusal_is_trait = refusal_is_trait
        self.min_scored = max(1, math.ceil(min_scored_fraction * len(self.questions)))
        self.per_setting = per_setting
        self.question_set = question_set
        # Steering is judged on greedy answers; the noise floor samples (steering.noise).
        self.temperature = 0.0
        # Per-question sampling seeds (the noise floor's replicates share one batch).
        self.question_seeds: list[int] | None = None
        self.last_cached = 0
        self.calls = no_calls()
        self.provenance: JudgeProvenance | None = None
        self.expected_trait_hash = rubric_hash(rubric)
        self.expected_coherence_hash = rubric_hash(coherence_rubric())

    async def evaluate(
        self, settings: Sequence[Setting], vectors: Sequence[np.ndarray]
    ) -> list[Evaluation]:
        """One ``Evaluation`` per setting, in order."""
        if not settings:
            return []
        if self.per_setting:
            out: list[Evaluation] = []
            for s in settings:
                out.extend(await self._evaluate_batch([s], vectors))
            return out
        return await self._evaluate_batch(list(settings), vectors)

    async def _evaluate_batch(
        self, settings: Sequence[Setting], vectors: Sequence[np.ndarray]
    ) -> list[Evaluation]:
        seeds: Sequence[int | None] = self.question_seeds or [None] * len(self.questions)
        rows = [
            PromptItem(Chat((("user", q),)), steering=s.steering(), seed=seed)
            for s in settings
            for q, seed in zip(self.questions, seeds, strict=True)
        ]
        used_vectors = vectors if any(s.steering() for s in settings) else ()
        generations = await self.loader.generate(
            rows,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=self.seed,
            vectors=used_vectors,
        )
        self._count(loader_calls=1, loader_rows=len(rows))
        return await self._judged(settings, generations)

    async def judge_again(self, evaluations: Sequence[Evaluation]) -> list[Evaluation]:
        """The same answers judged once more (the judge's own noise), in one judge call.

        A fresh judging: the backend scores every answer again instead of the cache answering."""
        generations = [
            Generation(text=a.answer, token_ids=[], finish_reason=a.finish_reason, prompt_tokens=0)
            for e in evaluations
            for a in e.answers
        ]
        return await self._judged([e.setting for e in evaluations], generations, fresh=True)

    async def _judged(
        self, settings: Sequence[Setting], generations: Sequence[Generation], *, fresh: bool = False
    ) -> list[Evaluation]:
        results = await self._judge([g.text for g in generations], fresh=fresh)
        n = len(self.questions)
        out: list[Evaluation] = []
        for k, setting in enumerate(settings):
            answers = [
                self._answer(
                    i,
                    generations[k * n + i],
                    results[2 * (k * n + i)],
                    results[2 * (k * n + i) + 1],
                )
                for i in range(n)
            ]
            stats = run_stats(answers)
            out.append(
                Evaluation(
                    setting=setting,
                    answers=answers,
                    stats=stats,
                    trait_values=[a.trait.used for a in answers],
                    coherence_ok=stats.n_coherence_scored >= self.min_scored,
                    eligible=stats.n_trait_scored >= self.min_scored,
                )
            )
        return out

    def _answer(
        self, index: int, generation: Generation, trait: JudgeResult, coherence: JudgeResult
    ) -> Answer:
        return Answer(
            index=index,
            question=self.questions[index],
            answer=generation.text,
            finish_reason=generation.finish_reason,
            trait=to_verdict(trait, refusal_is_trait=self.refusal_is_trait),
            coherence=to_verdict(coherence, refusal_is_trait=False),
        )

    async def _judge(self, answers: Sequence[str], *, fresh: bool = False) -> list[JudgeResult]:
        """Trait and coherence verdicts, interleaved (trait, coherence) per answer."""
        n = len(self.questions)
        items: list[JudgeItem] = []
        for j, text in enumerate(answers):
            question = self.questions[j % n]
            items.append(JudgeItem(question=question, answer=text, rubric=self.trait))
            items.append(JudgeItem(question=question, answer=text, rubric=COHERENCE))
        results = await self.judge.score(items, {self.trait: self.rubric}, strict=True, fresh=fresh)
        self._count(judge_calls=1, judge_items=len(items))
        # A re-judging (the noise floor) is no measurement where the cache answered.
        self.last_cached = sum(bool(r.cached) for r in results)
        if len(results) != len(items):
            raise FailedPrecondition(
                f"judge returned {len(results)} results for {len(items)} items"
            )
        self._check_provenance(results)
        return results

    def _check_provenance(self, results: Sequence[JudgeResult]) -> None:
        for r in results:
            if r.backend != self.expected_backend:
                raise FailedPrecondition(
                    f"judge: the job asks for the {self.expected_backend!r} backend but the "
                    f"judge answered with {r.backend!r} (model {r.model!r}); start a judge "
                    f"service with --backend {self.expected_backend} or fix the spec's judge"
                )
            if self.expected_model and r.model != self.expected_model:
                raise FailedPrecondition(
                    f"judge: the job asks for judge model {self.expected_model!r} but the "
                    f"judge answered with {r.model!r}"
                )
        trait = next((r for r in results if r.rubric == self.trait), None)
        coherence = next((r for r in results if r.rubric == COHERENCE), None)
        if trait is None or coherence is None:
            return
        seen = JudgeProvenance(
            backend=trait.backend,
            model=trait.model,
            trait_rubric_hash=trait.rubric_hash,
            coherence_rubric_hash=coherence.rubric_hash,
        )
        if self.provenance is None:
            self.provenance = seen
        elif seen != self.provenance:
            raise FailedPrecondition(
                f"judge changed during the job: {self.provenance.model_dump()} then "
                f"{seen.model_dump()}"
            )

    def _count(self, **delta: int) -> None:
        self.calls = add_calls(self.calls, no_calls().model_copy(update=delta))
