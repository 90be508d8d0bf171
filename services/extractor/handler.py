"""The ``extract`` job handler: wires the job plane, the loader and the judge to the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.contracts.extract import ExtractParams, ExtractSummary
from services.common.errors import FailedPrecondition
from services.common.handlers import JobContext, KindHandler, registry_handler
from services.common.jobs import Job, JobKind
from services.common.natsconn import shared_connection
from services.extractor.datasets import TraitDataset
from services.extractor.pipeline import (
    extract_needs,
    extract_result_key,
    extract_summary,
    run_extraction,
)
from services.loader.client import LoaderClient

__all__ = ["HANDLERS", "handle", "judge_over_nats"]


async def judge_over_nats(
    pairs: Sequence[tuple[str, str]], dataset: TraitDataset, trait: str, expected_backend: str = ""
) -> list[Any]:
    """Trait scores from the judge service (strict: transient failures redeliver the job)."""
    from services.judge.client import JudgeClient, trait_rubric

    client = JudgeClient.over_nats(await shared_connection("qsens-extractor"))
    rubric = trait_rubric(dataset.eval_prompt, dataset.exemplars.pos, dataset.exemplars.neg)
    results = await client.score_trait(pairs, rubric, trait=trait, strict=True)
    if expected_backend and results and results[0].backend != expected_backend:
        raise FailedPrecondition(
            f"judge: the spec asks for the {expected_backend} backend but the judge service "
            f"answered with {results[0].backend}"
        )
    return results


async def _extract(job: Job, params: ExtractParams, ctx: JobContext) -> dict[str, Any]:
    """Run one extraction against the variant's loader and the judge service."""
    address = await ctx.find_loader(params.variant, extract_needs(params))
    expected = params.judge.backend

    async def judge(
        pairs: Sequence[tuple[str, str]], dataset: TraitDataset, trait: str
    ) -> list[Any]:
        return await judge_over_nats(pairs, dataset, trait, expected)

    async with LoaderClient(address, expect_variant=params.variant) as loader:
        return await run_extraction(job.run_id, params, store=ctx.store, loader=loader, judge=judge)


#: The extractor's one kind: params contract, ``summary.json`` (written last) and the work.
HANDLERS: dict[JobKind, KindHandler[Any, Any]] = {
    JobKind.EXTRACT: KindHandler(
        JobKind.EXTRACT,
        ExtractParams,
        _extract,
        ExtractSummary,
        extract_result_key,
        extract_summary,
    )
}

handle = registry_handler(HANDLERS)
"""Run one extraction (``dispatch`` over ``HANDLERS``)."""
