"""Vetting acts: the judge's verdicts decide which contrast pairs a vector is computed from.

Real parts throughout: a tiny Llama loader process over gRPC, SeaweedFS S3, and the judge's
openai backend against a local OpenAI-format HTTP endpoint whose score depends on the question.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from services.common.artefacts import extract_key
from services.common.contracts.common import TraitParams
from services.common.contracts.extract import ExtractParams
from services.common.settings import JudgeSettings
from services.common.spec import ExtractionSpec, VettingSpec
from services.common.store import AsyncS3Store
from services.common.tensor_codec import load_safetensors
from services.extractor.datasets import TraitDataset
from services.extractor.methods import VectorSet
from services.extractor.pipeline import TooFewVettedExamples, run_extraction
from services.judge.client import JudgeClient, trait_rubric
from services.loader.client import LoaderClient
from tests.conftest import PlaneEnv
from tests.judge.fake_openai import FakeOpenAI, fake_openai, table
from tests.loader_procs import LoaderProc

TRAIT = "pv/evil"
KEEP_BOTH = table({"50": 1.0})  # between negative_max and positive_min: every row kept
LOW = table({"30": 1.0})  # a positive that shows no trait: dropped; a negative: kept
CONTESTED = table({"REFUSAL": 0.55, "30": 0.45})  # REFUSAL by the refusal-over-score rule


@pytest.fixture
def judged() -> Iterator[tuple[FakeOpenAI, Any]]:
    """The judge (openai backend, in process) over a local endpoint; ``KEEP_BOTH`` by default.
    Each call starts a fresh judge: its verdict cache must not carry one run's scores over."""
    with fake_openai() as fake:
        fake.default_table = KEEP_BOTH
        settings = JudgeSettings(
            backend="openai",
            base_url=fake.base_url,
            model="fake-judge",
            api_key="sk-test-not-a-real-key",
            rate_per_s=1000.0,
            burst=1000,
            batch_window_s=0.005,
        )

        async def judge(
            pairs: Sequence[tuple[str, str]], dataset: TraitDataset, trait: str
        ) -> list[Any]:
            rubric = trait_rubric(dataset.eval_prompt, dataset.exemplars.pos, dataset.exemplars.neg)
            client = await JudgeClient.direct(settings)
            try:
                return await client.score_trait(pairs, rubric, trait=trait, strict=True)
            finally:
                await client.close()

        yield fake, judge


def _params(variant: str, min_keep: int) -> ExtractParams:
    return ExtractParams(
        variant=variant,
        trait=TraitParams(ref=TRAIT, name=TRAIT, methodology="pv"),
        position="response[:]",
        methods=["mean_diff"],
        extraction=ExtractionSpec(
            n_train=6,
            n_val=2,
            max_new_tokens=8,
            store_activations=True,
            vetting=VettingSpec(positive_min=40, negative_max=60, min_keep=min_keep),
        ),
    )


async def _extract(run_id: str, loader: LoaderProc, judge: Any, min_keep: int) -> None:
    store = AsyncS3Store()
    await store.ensure_bucket()
    async with LoaderClient(loader.address, expect_variant=loader.variant) as client:
        await run_extraction(
            run_id, _params(loader.variant, min_keep), store=store, loader=client, judge=judge
        )


async def _read(run_id: str, variant: str, *leaf: str) -> Any:
    store = AsyncS3Store()
    key = extract_key(run_id, variant, TRAIT, "native", *leaf)
    if leaf[-1].endswith(".jsonl"):
        return await store.get_jsonl(key)
    if leaf[-1].endswith(".json"):
        return await store.get_json(key)
    return await store.get_bytes(key)


async def test_judge_drops_pairs_and_the_vector_follows(
    s3_env: PlaneEnv, tiny_loader: LoaderProc, judged: tuple[FakeOpenAI, Any]
) -> None:
    fake, judge = judged
    variant = tiny_loader.variant
    every = "run-" + uuid.uuid4().hex[:12]
    await _extract(every, tiny_loader, judge, min_keep=2)
    rows = await _read(every, variant, "responses.jsonl")
    assert all(r["kept"] for r in rows)
    train_pos = [r for r in rows if r["split"] == "train" and r["label"] == 1]
    assert len(train_pos) >= 4
    # The judge now finds no trait in the answers to one training question, and calls those to
    # another REFUSAL over a scorable number (refusal-over-score): their positives go.
    low_q, contested_q = list(dict.fromkeys(r["question"] for r in train_pos))[:2]
    fake.by_question[low_q] = LOW
    fake.by_question[contested_q] = CONTESTED
    dropped_questions = {low_q, contested_q}
    vetted = "run-" + uuid.uuid4().hex[:12]
    await _extract(vetted, tiny_loader, judge, min_keep=2)
    after = await _read(vetted, variant, "responses.jsonl")
    assert [r["response"] for r in after] == [r["response"] for r in rows]  # same generations
    expect_dropped = {
        r["key"] for r in after if r["label"] == 1 and r["question"] in dropped_questions
    }
    assert expect_dropped and {r["key"] for r in after if not r["kept"]} == expect_dropped
    for r in after:
        if r["question"] == contested_q:
            assert r["judge"]["status"] == "refusal" and r["judge"]["refusal_over_score"]
        else:
            assert r["judge"]["score"] == pytest.approx(30.0 if r["question"] == low_q else 50.0)
            assert not r["judge"]["refusal_over_score"]
    vetting = await _read(vetted, variant, "vetting.json")
    assert vetting["dropped_pos"] == len(expect_dropped) and vetting["dropped_neg"] == 0
    # The vetting summary reports how many judgments the refusal-over-score rule decided.
    assert vetting["refusal_over_score"] == sum(r["question"] == contested_q for r in after) > 0
    summary = await _read(vetted, variant, "summary.json")
    n_dropped_train = sum(1 for r in after if r["key"] in expect_dropped and r["split"] == "train")
    assert summary["n_train_pos"] == len(train_pos) - n_dropped_train
    # The vetted vector is the mean difference over exactly the kept rows of the first run.
    acts, meta = load_safetensors(await _read(every, variant, "activations.safetensors"))
    dropped_ids = {r["pair_id"] for r in after if r["key"] in expect_dropped}
    keep = [pid not in dropped_ids for pid in json.loads(meta["pair_ids"])["train_pos"]]
    assert not all(keep)
    expected = acts["train_pos"][keep].astype(np.float64).mean(0) - acts["train_neg"].astype(
        np.float64
    ).mean(0)
    old = VectorSet.from_safetensors(
        await _read(every, variant, "vectors", "mean_diff.safetensors")
    ).vectors
    new = VectorSet.from_safetensors(
        await _read(vetted, variant, "vectors", "mean_diff.safetensors")
    ).vectors
    scale = np.abs(expected).max()
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-4 * scale)
    assert np.abs(new - old).max() > 100 * 1e-4 * scale  # the drop moved the vector


async def test_too_few_pairs_left_fails_the_job_with_a_named_error(
    s3_env: PlaneEnv, tiny_loader: LoaderProc, judged: tuple[FakeOpenAI, Any]
) -> None:
    fake, judge = judged
    fake.default_table = LOW  # no positive shows the trait
    run_id = "run-" + uuid.uuid4().hex[:12]
    with pytest.raises(TooFewVettedExamples) as err:
        await _extract(run_id, tiny_loader, judge, min_keep=2)
    assert (err.value.split, err.value.label, err.value.have, err.value.need) == (
        "train",
        "positive",
        0,
        2,
    )
    assert "survived vetting" in str(err.value)
    store = AsyncS3Store()
    assert not await store.exists(
        extract_key(run_id, tiny_loader.variant, TRAIT, "native", "summary.json")
    )
    assert not await store.list_keys(
        extract_key(run_id, tiny_loader.variant, TRAIT, "native", "vectors")
    )
