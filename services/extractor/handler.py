"""The ``extract`` job handler: wires the job plane, the loader and the judge to the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.contracts.common import parse_params
from services.common.contracts.extract import ExtractParams
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.jobs import Job, JobKind
from services.common.natsconn import shared_connection
from services.common.queue import JobContext
from services.extractor.datasets import TraitDataset
from services.extractor.pipeline import run_extraction
from services.loader.client import LoaderClient

__all__ = ["handle", "judge_over_nats"]


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


async def handle(job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Run one extraction."""
    if job.kind is not JobKind.EXTRACT:
        raise InvalidArgument("kind", f"the extractor handles extract jobs, not {job.kind}")
    params = parse_params(ExtractParams, job.params)
    address = await ctx.find_loader(params.variant)
    expected = params.judge.backend

    async def judge(
        pairs: Sequence[tuple[str, str]], dataset: TraitDataset, trait: str
    ) -> list[Any]:
        return await judge_over_nats(pairs, dataset, trait, expected)

    async with LoaderClient(address, expect_variant=params.variant) as loader:
        return await run_extraction(job.run_id, params, store=ctx.store, loader=loader, judge=judge)
