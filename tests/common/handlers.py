"""Job handlers used by the job-plane tests, importable by worker subprocesses."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from services.common.errors import InvalidArgument
from services.common.handlers import JobContext
from services.common.jobs import Job


async def record_execution(job: Job, ctx: JobContext) -> None:
    """One object per execution of a job, so tests can count how often it ran."""
    key = ctx.key("executions", job.id, f"{ctx.attempt}-{os.getpid()}-{id(ctx)}")
    await ctx.store.put_bytes(key, b"")


async def parts(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Write ``parts`` JSONL results, sleeping ``delay_s`` after each (a slow, resumable job)."""
    await record_execution(job, ctx)
    count = int(job.params.get("parts", 3))
    delay = float(job.params.get("delay_s", 0.0))
    written = 0
    for i in range(count):
        row = {"job": job.id, "part": i, "attempt": ctx.attempt, "pid": os.getpid()}
        written += await ctx.store.put_jsonl(ctx.key("results", job.id, f"part-{i}.jsonl"), [row])
        await asyncio.sleep(delay)
    return {"parts": count, "written_now": written}


async def behave(job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Do what ``params['do']`` says: ok | fail | invalid | loader | sleep."""
    await record_execution(job, ctx)
    action = job.params.get("do", "ok")
    if action == "fail":
        raise RuntimeError(f"boom on attempt {ctx.attempt}")
    if action == "invalid":
        raise InvalidArgument("params.do", "this job can never work")
    if action == "loader":
        return {"address": await ctx.find_loader(str(job.params["variant"]))}
    if action == "sleep":
        await asyncio.sleep(float(job.params["seconds"]))
    return {"ok": True, "attempt": ctx.attempt}
