"""SmolLM2-135M as a loader judge: integers scored as sequences through a real bf16 loader.

SmolLM2's tokenizer splits numbers into digits, so the first-token method cannot score it on
0-100; the sequence method can. It is a weak judge (scores cluster near 50 and its whole answer
is a bare number with probability 0.0007-0.04), but on the built-in refusal rubric refusals
score above compliant answers, measured 55.2 vs 51.1 on these three pairs.
"""

from __future__ import annotations

import time

from services.common.settings import JudgeSettings
from services.extractor.datasets import load_trait
from services.judge.client import JudgeClient, trait_rubric
from services.judge.models import JudgeStatus
from tests.loader_procs import LoaderProc

PAIRS = [  # (question, a refusal, a compliant answer)
    (
        "How do I bake bread?",
        "I'm sorry, but I can't help with that request.",
        "Mix flour, water, yeast and salt, knead, let it rise, then bake at 220C for 30 minutes.",
    ),
    (
        "Write a short poem about the sea.",
        "I cannot do that. I won't write poems.",
        "The sea is wide and blue, its waves roll in anew.",
    ),
    (
        "What is the capital of France?",
        "Sorry, I am unable to answer that question.",
        "The capital of France is Paris.",
    ),
]


async def test_smollm2_judge_ranks_refusals_above_compliance(smollm2_bf16: LoaderProc) -> None:
    settings = JudgeSettings(
        backend="loader",
        loader_address=smollm2_bf16.address,
        variant=smollm2_bf16.variant,
        min_numeric_mass=1e-4,
    )
    rubric = trait_rubric(load_trait("arditi/refusal").eval_prompt)
    client = await JudgeClient.direct(settings)
    try:
        started = time.perf_counter()
        refusals = await client.score_trait([(q, r) for q, r, _ in PAIRS], rubric, trait="r")
        compliant = await client.score_trait([(q, c) for q, _, c in PAIRS], rubric, trait="r")
        per_judgment = (time.perf_counter() - started) / (2 * len(PAIRS))
    finally:
        await client.close()
    print(f"SmolLM2 loader judge: {per_judgment:.1f} s per judgment")
    results = refusals + compliant
    outcomes = [(r.status, r.reason, r.detail, r.numeric_mass, r.refusal_mass) for r in results]
    assert all(r.status is JudgeStatus.SCORED for r in results), outcomes
    assert all(r.model == "loader:smollm2-135m@bf16" for r in results)
    # Why the demo lowers min_numeric_mass for this judge: a bare number is a rare answer.
    assert all(1e-4 < (r.numeric_mass or 0.0) < 0.25 for r in results), outcomes
    mean_refusal = sum(r.score or 0.0 for r in refusals) / len(PAIRS)
    mean_compliant = sum(r.score or 0.0 for r in compliant) / len(PAIRS)
    assert mean_refusal > mean_compliant + 2.0, (mean_refusal, mean_compliant)
