"""The loader judge (integers scored as sequences through Score) against a real loader.

On a tiny judge trained in the test (``tiny_judge_model``: whole numbers are single tokens) the
sequence score and the first-token score (openai backend on the same loader's OpenAI endpoint)
agree; bad input gets named errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.settings import JudgeSettings
from services.judge.aggregate import REFUSAL_WORD, Aggregate, aggregate
from services.judge.backends.base import WorkItem
from services.judge.backends.loader_backend import LoaderJudgeBackend
from services.judge.client import JudgeClient, trait_rubric
from services.judge.models import JudgeResult, JudgeStatus
from services.judge.rubrics import render_prompt, rubric_hash
from services.loader.client import Chat, LoaderClient, PromptItem
from tests.judge.tiny_judge_model import LEVELS, QUESTION, REFUSING, RUBRIC, build_tiny_judge
from tests.loader_procs import LoaderProc, start_loader

# Largest difference accepted between the sequence score and the first-token score over the
# whole integer table (NextToken log-probs of "0".."100"), in score points: they differ only by
# p(end-of-turn | n) < 1. Measured with an earlier judge (seed 2, 300 steps at lr 5e-3): at most
# 0.011 (0.19 with the earlier, less trained judge).
AGREEMENT_TOLERANCE = 0.5
# The same against the openai backend's first-token method, which sees only the top 20
# alternatives: the tiny judge spreads its numbers wider than that, so the cut moves the mean.
# Measured: at most 0.87 (4.3 with the earlier judge).
TOP20_TOLERANCE = 6.0


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoaderProc]:
    folder = build_tiny_judge(tmp_path_factory.mktemp("tiny-judge") / "model")
    proc = start_loader(str(folder), "fp32", http=True, metrics=False)
    yield proc
    proc.stop()


def _settings(proc: LoaderProc, **overrides: Any) -> JudgeSettings:
    values: dict[str, Any] = {
        "backend": "loader",
        "loader_address": proc.address,
        "variant": proc.variant,
        "loader_timeout_s": 60.0,
    }
    values.update(overrides)
    return JudgeSettings(**values)


async def _judge(settings: JudgeSettings, answers: list[str]) -> list[JudgeResult]:
    client = await JudgeClient.direct(settings)
    try:
        return await client.score_trait(
            [(QUESTION, a) for a in answers], trait_rubric(RUBRIC), trait="cruel"
        )
    finally:
        await client.close()


async def _first_token_full(proc: LoaderProc, answer: str) -> Aggregate:
    """The first-token score from NextToken log-probs of every integer token (no top-k cut)."""
    labels = [*(str(n) for n in range(101)), REFUSAL_WORD]
    prompt = render_prompt(RUBRIC, QUESTION, answer, 16000)
    async with LoaderClient(proc.address) as loader:
        (nt,) = await loader.next_token(
            [PromptItem(Chat.of([("user", prompt)]))], top_k=1, token_strings=labels
        )
    return aggregate(list(zip(labels, nt.requested_logprobs, strict=True)))


async def test_sequence_and_first_token_scores_agree(tiny_judge: LoaderProc) -> None:
    answers = [*LEVELS, REFUSING]
    sequence = await _judge(_settings(tiny_judge), answers)
    top20 = await _judge(
        JudgeSettings(
            backend="openai",
            base_url=tiny_judge.http_base,
            model=tiny_judge.variant,
            timeout_s=60,
            max_retries=1,
        ),
        answers,
    )
    for answer, seq, cut in zip(answers, sequence, top20, strict=True):
        full = await _first_token_full(tiny_judge, answer)
        assert seq.backend == "loader" and seq.model == f"loader:{tiny_judge.variant}"
        assert seq.status is full.status is cut.status, (answer, seq, full, cut)
        assert seq.numeric_mass == pytest.approx(full.numeric_mass, abs=0.02)
        if answer == REFUSING:  # every method sees the refusal
            assert seq.status is JudgeStatus.REFUSAL and seq.score is None, seq
            continue
        assert seq.score is not None and full.score is not None and cut.score is not None
        assert abs(seq.score - full.score) <= AGREEMENT_TOLERANCE, (answer, seq, full)
        assert abs(seq.score - cut.score) <= TOP20_TOLERANCE, (answer, seq, cut)
    # The judge learned the levels: the scores rank them (5 < 25 < 50 < 75 < 95).
    scored = [float(r.score or 0.0) for r in sequence[: len(LEVELS)]]
    assert scored == sorted(scored) and scored[-1] - scored[0] > 60


async def test_one_score_call_per_judgment(tiny_judge: LoaderProc) -> None:
    backend = LoaderJudgeBackend(_settings(tiny_judge))
    await backend.start()
    try:
        assert backend.end_of_turn == "<|im_end|>"
        conts = backend.continuations()
        assert len(conts) == 102 and conts[57] == "57<|im_end|>"
        assert conts[-1] == "REFUSAL<|im_end|>"
        rubric = trait_rubric(RUBRIC)
        items = [
            WorkItem(QUESTION, a, "cruel", rubric, rubric_hash(rubric), str(i))
            for i, a in enumerate(LEVELS)
        ]
        verdicts = await backend.score_batch(items)
        assert backend._loader is not None
        assert backend._loader.attempts["Score"] == len(LEVELS)  # one call per judgment
        assert [v.status for v in verdicts] == [JudgeStatus.SCORED] * len(LEVELS)
        assert all(v.top_logprobs and len(v.top_logprobs) == 20 for v in verdicts)
    finally:
        await backend.close()


async def test_variant_not_served_is_a_named_error(tiny_judge: LoaderProc) -> None:
    backend = LoaderJudgeBackend(_settings(tiny_judge, variant="smollm2-135m@bf16"))
    with pytest.raises(FailedPrecondition, match="'smollm2-135m@bf16' is not served"):
        await backend.start()


async def test_no_loader_and_unreachable_loader_are_named_errors() -> None:
    with pytest.raises(FailedPrecondition, match="needs a loader"):
        await LoaderJudgeBackend(JudgeSettings(backend="loader")).start()
    unreachable = JudgeSettings(
        backend="loader", loader_address="127.0.0.1:1", loader_timeout_s=1, loader_wait_s=0
    )
    with pytest.raises(FailedPrecondition, match="unreachable"):
        await LoaderJudgeBackend(unreachable).start()


async def test_rubric_without_a_numeric_scale_is_refused(tiny_judge: LoaderProc) -> None:
    client = await JudgeClient.direct(_settings(tiny_judge))
    try:
        with pytest.raises(InvalidArgument, match="no 0-100 scale") as caught:
            await client.score_trait(
                [(QUESTION, "kind")],
                trait_rubric("Is this answer cruel? {question} {answer} Say yes or no."),
                trait="cruel",
            )
        assert caught.value.field == "rubrics.cruel.eval_prompt"
    finally:
        await client.close()


def test_tiny_judge_tokenizer_has_whole_numbers(tmp_path: Path) -> None:
    from tests.judge.tiny_judge_model import _tokenizer

    tok: Any = _tokenizer()
    for n in (0, 7, 57, 100):
        assert tok(str(n), add_special_tokens=False)["input_ids"] == [
            tok.convert_tokens_to_ids(str(n))
        ]


async def test_agreement_with_a_second_judge(tiny_judge: LoaderProc) -> None:
    from services.judge.agreement import (
        AnsweredItem,
        agreement_markdown,
        judge_agreement,
        sample_answers,
    )

    # The "study judge" here scores each level by its true value; the tiny loader judge ranks
    # them the same way, so Spearman is exactly 1.
    items = [AnsweredItem("t/cruel", QUESTION, a, s) for a, s in LEVELS.items()]
    items += [AnsweredItem("t/cruel", QUESTION, "kind", 25.0)]  # a duplicate answer
    sample = sample_answers(items, per_trait=4)
    assert [i.score for i in sample] == [5.0, 25.0, 75.0, 95.0]  # spread, no duplicates
    doc = await judge_agreement(sample, _settings(tiny_judge), {"t/cruel": trait_rubric(RUBRIC)})
    row = doc["traits"]["t/cruel"]
    assert row["n"] == 4 and row["spearman"] == pytest.approx(1.0)
    assert row["pearson"] > 0.9 and row["unscorable"] == 0
    assert doc["second_judge"]["model"] == f"loader:{tiny_judge.variant}"
    text = agreement_markdown(doc, "embedding backend")
    assert "## Judge agreement" in text and "| t/cruel | 4 | +1.00 |" in text
