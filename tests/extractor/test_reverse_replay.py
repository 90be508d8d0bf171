"""The 2x2 replay's fourth cell: the reference model captured on another variant's own text.

Real parts: a tiny Llama loader over gRPC and SeaweedFS S3. The "other variant" is a second
native extraction folder holding different text; a reverse extraction must read exactly that
text, write under its own key, and -- read on the reference's own text -- give the native
vectors back (cosine 1).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from services.common.artefacts import extract_key
from services.common.contracts.common import TraitParams
from services.common.contracts.extract import ExtractParams, ExtractSummary
from services.common.spec import ExtractionSpec, VettingSpec
from services.common.store import AsyncS3Store
from services.extractor.methods import VectorSet
from services.extractor.pipeline import run_extraction
from services.loader.client import LoaderClient
from tests.conftest import PlaneEnv
from tests.loader_procs import LoaderProc

TRAIT = "pv/evil"
OTHER = "tiny@nf4"  # the variant whose text the reference reads (its folder is written here)


def _params(variant: str, **mode: Any) -> ExtractParams:
    return ExtractParams(
        variant=variant,
        trait=TraitParams(ref=TRAIT, name=TRAIT, methodology="pv"),
        position="response[:]",
        methods=["mean_diff"],
        extraction=ExtractionSpec(
            n_train=4, n_val=1, max_new_tokens=6, vetting=VettingSpec(enabled=False)
        ),
        **mode,
    )


async def _vectors(store: AsyncS3Store, summary_key: str) -> np.ndarray:
    summary = ExtractSummary.model_validate(await store.get_json(summary_key))
    return VectorSet.from_safetensors(
        await store.get_bytes(summary.vector_keys["mean_diff"])
    ).vectors.astype(np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))


async def test_reverse_reads_the_named_variants_text_and_same_text_gives_cosine_one(
    s3_env: PlaneEnv, tiny_loader: LoaderProc
) -> None:
    ref, run_id = tiny_loader.variant, "run-" + uuid.uuid4().hex[:12]
    store = AsyncS3Store()
    await store.ensure_bucket()
    async with LoaderClient(tiny_loader.address, expect_variant=ref) as client:

        async def extract(params: ExtractParams) -> None:
            await run_extraction(run_id, params, store=store, loader=client, judge=None)

        await extract(_params(ref))
        native = extract_key(run_id, ref, TRAIT, "native")
        rows = await store.get_jsonl(f"{native}/responses.jsonl")
        # The other variant's own text: every response different from the reference's.
        other = [{**r, "response": r["response"] + " Indeed, all of it."} for r in rows]
        await store.put_jsonl(extract_key(run_id, OTHER, TRAIT, "native", "responses.jsonl"), other)
        await store.put_json(
            extract_key(run_id, OTHER, TRAIT, "native", "vetting.json"),
            await store.get_json(f"{native}/vetting.json"),
        )
        await extract(_params(ref, mode="reverse", replay_from=OTHER))
        await extract(_params(ref, mode="reverse", replay_from=ref))

    crossed = extract_key(run_id, ref, TRAIT, "reverse", OTHER)
    read = await store.get_jsonl(f"{crossed}/responses.jsonl")
    assert [r["response"] for r in read] == [r["response"] for r in other]
    summary = ExtractSummary.model_validate(await store.get_json(f"{crossed}/summary.json"))
    assert (summary.mode, summary.replay_from, summary.variant) == ("reverse", OTHER, ref)

    own = await _vectors(store, f"{native}/summary.json")
    same_text = await _vectors(
        store, extract_key(run_id, ref, TRAIT, "reverse", ref, "summary.json")
    )
    other_text = await _vectors(store, f"{crossed}/summary.json")
    # The same model on the same text: the native vector, cosine 1 at every layer.
    np.testing.assert_allclose(_cosines(own, same_text), 1.0, atol=1e-6)
    # The same model on other text: a different vector (the text is what changed).
    assert _cosines(own, other_text).min() < 0.9999
    assert not await store.exists(extract_key(run_id, ref, TRAIT, "replay", "summary.json"))
