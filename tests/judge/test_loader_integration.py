"""The judge against a real loader process (tiny random model): HTTP judge and gRPC perplexity."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.common.errors import FailedPrecondition
from services.common.settings import JudgeSettings
from services.judge.backends.embedding_backend import NLL_BAD, NLL_GOOD, EmbeddingBackend
from services.judge.client import JudgeClient
from services.judge.models import JudgeStatus
from tests.judge.loader_checks import PAIRS, judge_through_loader

pytestmark = pytest.mark.slow


async def test_openai_backend_on_a_loader_endpoint(judge_tiny_loader: Any) -> None:
    results = await judge_through_loader(judge_tiny_loader.http_base, judge_tiny_loader.variant)
    assert len(results) == 2 * len(PAIRS)


async def test_coherence_perplexity_through_loader_score(
    judge_tiny_loader: Any, embedding_model: Any
) -> None:
    settings = JudgeSettings(backend="embedding", loader_address=judge_tiny_loader.address)
    client = await JudgeClient.direct(settings, model=embedding_model)
    try:
        results = await client.score_coherence([*PAIRS, ("q", "")])
    finally:
        await client.close()
    for result in results[:-1]:
        assert result.status is JudgeStatus.SCORED
        assert result.model == f"all-MiniLM-L6-v2+ppl:{judge_tiny_loader.variant}"
        signals = result.signals
        assert set(signals) == {"repetition", "structure", "lexicon", "perplexity", "nll"}
        assert math.isfinite(signals["nll"]) and signals["nll"] > 0
        expected_ppl = 100 * min(1.0, max(0.0, (NLL_BAD - signals["nll"]) / (NLL_BAD - NLL_GOOD)))
        assert signals["perplexity"] == pytest.approx(expected_ppl, abs=1e-3)
        product = math.prod(
            signals[s] / 100 for s in ("repetition", "structure", "lexicon", "perplexity")
        )
        assert result.score == pytest.approx(100 * product, abs=1e-3)
    assert results[-1].score == 0.0 and "nll" not in results[-1].signals


async def test_unreachable_loader_is_reported(embedding_model: Any) -> None:
    backend = EmbeddingBackend(
        JudgeSettings(
            backend="embedding", loader_address="127.0.0.1:1", timeout_s=1, loader_timeout_s=1
        ),
        model=embedding_model,
    )
    with pytest.raises(FailedPrecondition, match="unreachable"):
        await backend.start()
