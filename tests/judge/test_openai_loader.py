"""The openai judge backend against a loader's OpenAI-compatible endpoint on SmolLM2.

``smollm2_loader_http`` (the base URL, ``http://127.0.0.1:<port>/v1``, of a loader serving
``smollm2-135m@bf16``) is provided by the loader's fixtures. SmolLM2's tokenizer splits numbers
into digits, so its first-token scores live on 0-9 (see ``services.judge.aggregate``).
"""

from __future__ import annotations

import pytest

from services.judge.models import JudgeStatus
from tests.judge.loader_checks import PAIRS, judge_through_loader

pytestmark = pytest.mark.slow


async def test_openai_judge_on_smollm2_endpoint(smollm2_loader_http: str) -> None:
    results = await judge_through_loader(smollm2_loader_http, "smollm2-135m@bf16")
    assert len(results) == 2 * len(PAIRS)
    for result in results:
        assert result.top_logprobs is not None
        if result.status is JudgeStatus.SCORED:
            # Single-digit first tokens: the weighted mean stays within 0-9.
            assert result.score is not None and result.score <= 9
