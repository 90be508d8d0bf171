"""The backend interface every judge backend implements, and the lazy registry of backends.

A backend turns a micro-batch of work items into one verdict per item, in order. It never
raises for one item's trouble: that item's verdict is ``unscorable`` with a reason. Backends are
named in a registry of ``"module:Class"`` strings so that heavy dependencies (openai,
sentence-transformers) are imported only when that backend is selected.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from services.common.errors import InvalidArgument
from services.common.settings import JudgeSettings
from services.judge.aggregate import aggregate
from services.judge.metrics import judge_metrics
from services.judge.models import JudgeStatus, Reason, Rubric, TokenLogprob, Verdict

__all__ = [
    "BACKENDS",
    "BackendStats",
    "JudgeBackend",
    "WorkItem",
    "create_backend",
]

#: Backend name -> "module:Class", imported on selection.
BACKENDS: dict[str, str] = {
    "openai": "services.judge.backends.openai_backend:OpenAIBackend",
    "embedding": "services.judge.backends.embedding_backend:EmbeddingBackend",
    "loader": "services.judge.backends.loader_backend:LoaderJudgeBackend",
}


@dataclass(frozen=True)
class WorkItem:
    """One item ready for a backend: text, resolved rubric, and its content address."""

    question: str
    answer: str
    rubric_key: str
    rubric: Rubric
    rubric_hash: str
    key: str


@dataclass
class BackendStats:
    """Counters a backend keeps for its own process (tests and benchmarks read them)."""

    upstream_calls: int = 0
    retries: int = 0
    items: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # Judgments the refusal-over-score setting decided (see services.judge.aggregate).
    refusal_over_score: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1


class JudgeBackend(ABC):
    """Scores micro-batches of work items."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.stats = BackendStats()

    @property
    @abstractmethod
    def model(self) -> str:
        """The judge model's name as recorded with every score."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Backend settings that change scores; they enter every cache key."""

    def check_rubric(self, rubric: Rubric, field: str) -> None:
        """Raise InvalidArgument naming ``field`` for a rubric this backend cannot score."""
        return None

    async def start(self) -> None:
        """Load models and open connections (idempotent)."""
        return None

    @abstractmethod
    async def score_batch(self, batch: Sequence[WorkItem]) -> list[Verdict]:
        """One verdict per item, in order; an item's failure is its own verdict."""

    async def close(self) -> None:
        """Release connections and models."""
        return None

    def table_verdict(
        self,
        table: Sequence[tuple[str, float]],
        settings: JudgeSettings,
        shown: Sequence[tuple[str, float]],
        **extra: Any,
    ) -> Verdict:
        """The verdict of a log-prob table of answers (``aggregate``), counting the verdicts
        the refusal-over-score rule decided; ``shown``: the entries kept in the verdict,
        ``extra``: fields every verdict of this call carries (token usage)."""
        try:
            result = aggregate(
                table, settings.min_numeric_mass, refusal_over_score=settings.refusal_over_score
            )
        except ValueError as exc:
            return Verdict(
                status=JudgeStatus.UNSCORABLE,
                reason=Reason.INVALID_RESPONSE,
                detail=str(exc)[:2000],
                **extra,
            )
        if result.contested:
            self.stats.refusal_over_score += 1
            judge_metrics().refusal_over_score.labels(self.name, result.status.value).inc()
        return Verdict(
            status=result.status,
            score=result.score,
            reason=result.reason,
            detail=result.detail,
            numeric_mass=result.numeric_mass,
            refusal_mass=result.refusal_mass,
            refusal_over_score=result.contested,
            top_logprobs=[TokenLogprob(token=t[:64], logprob=lp) for t, lp in shown],
            **extra,
        )


def create_backend(settings: JudgeSettings, **options: Any) -> JudgeBackend:
    """Instantiate the backend ``settings.backend`` names (imports it on first use)."""
    target = BACKENDS.get(settings.backend)
    if target is None:
        raise InvalidArgument("backend", f"unknown judge backend {settings.backend!r}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    backend = cls(settings, **options)
    assert isinstance(backend, JudgeBackend)
    return backend
