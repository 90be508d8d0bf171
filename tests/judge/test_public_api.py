"""The judge's public surface is what we meant, and importing it does nothing heavy."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MODULES = {
    "services.judge.models": {
        "COHERENCE",
        "REQUEST_LIMIT",
        "Exemplars",
        "JudgeItem",
        "JudgeReply",
        "JudgeRequest",
        "JudgeResult",
        "JudgeStatus",
        "Reason",
        "ReplyError",
        "Rubric",
        "TokenLogprob",
        "Verdict",
        "invalid_argument",
        "parse_request",
    },
    "services.judge.client": {"JudgeClient", "trait_rubric"},
    "services.judge.service": {"JudgeNames", "JudgeService", "judge_names", "run_judge_service"},
    "services.judge.engine": {"Judge"},
    "services.judge.aggregate": {
        "DEFAULT_MIN_MASS",
        "REFUSAL_WORD",
        "Aggregate",
        "aggregate",
        "is_refusal_token",
        "parse_score_token",
    },
    "services.judge.rubrics": {
        "COHERENCE_PROMPT",
        "coherence_rubric",
        "defang",
        "render_prompt",
        "resolve_rubric",
        "rubric_hash",
        "validate_template",
    },
    "services.judge.cache": {
        "CACHE_FORMAT",
        "JudgeCache",
        "KvJudgeCache",
        "MemoryJudgeCache",
        "NullJudgeCache",
        "cache_key",
    },
    "services.judge.resilience": {
        "BreakerState",
        "CircuitBreaker",
        "RetryPolicy",
        "TokenBucket",
        "parse_retry_after",
    },
    "services.judge.batcher": {"MicroBatcher"},
    "services.judge.metrics": {"JudgeMetrics", "judge_metrics"},
    "services.judge.backends.base": {
        "BACKENDS",
        "BackendStats",
        "JudgeBackend",
        "WorkItem",
        "create_backend",
    },
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_exports(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == MODULES[name]
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.{symbol}"


def test_importing_the_judge_is_light() -> None:
    code = (
        "import sys, prometheus_client\n"
        "import services.judge.client, services.judge.service, services.cli.judge_cmd\n"
        "heavy = {'openai', 'sentence_transformers', 'torch', 'transformers'} & set(sys.modules)\n"
        "metrics = [m for m in prometheus_client.REGISTRY._names_to_collectors "
        "if m.startswith('qsens_judge')]\n"
        "print(sorted(heavy), metrics)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"
