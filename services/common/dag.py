"""Runs as DAGs on the job plane: submit a plan, release dependents as their inputs finish.

There is no scheduler process. Whoever finishes a job releases its dependents; a dependent
is queued by the finisher whose compare-and-set completes its set of done deps (fan-in), and
that finisher, recorded as ``released_by``, publishes it. Every publish carries the job id as
``Nats-Msg-Id``, so the server stores a job once however often it is published within the
duplicate window, and a worker that receives a job already done does not run it again.

Crash points, and why each loses nothing and duplicates nothing:

1. ``submit`` dies part-way. Submitting the same plan again completes it: the plan object,
   the run record and the job records are created only where missing, and roots that are
   still queued are published again (deduplicated).
2. A worker dies while the handler runs, or after its results are written but before the
   job is marked done. No ack and no heartbeat: the message is redelivered after ``ack_wait``.
   The next attempt writes the same keys; objects are write-once, so what the first attempt
   stored stays and the job ends with a single set of results.
3. A worker dies after marking the job done, before releasing. The redelivered message finds
   the job done, skips the handler, releases the dependents and acks.
4. A worker dies while releasing. Each dependent's record changes only by compare-and-set:
   its dep is added to ``deps_done`` once, and exactly one finisher flips it from pending to
   queued. If that finisher dies before publishing, its redelivered job (3.) finds the
   dependent queued with ``released_by`` = itself and publishes it; if the first publish did
   happen, the server drops the second as a duplicate.
5. A worker dies after releasing, before acking. Same as 3.: dependents are already queued,
   running or done and are left alone (or re-published and deduplicated if still queued).
6. Two deps of a fan-in job finish at once. Their compare-and-set updates of the dependent's
   record are serialised by the KV revision; the loser re-reads and sees the other's dep.
7. A job is published again after the duplicate window (e.g. a second ``submit`` days
   later). The worker compares the record's ``msg_seq``: a job done is skipped, and a job
   another unacked message is carrying is dropped, so it still runs once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.js import JetStreamContext
from pydantic import BaseModel

from services.common import settings as settings_mod
from services.common.errors import FailedPrecondition
from services.common.jobs import Job, RunPlan
from services.common.logging import get_logger
from services.common.natsconn import connection
from services.common.queue import JobQueue
from services.common.settings import NatsSettings
from services.common.state import JobRecord, JobState, RunRecord, StateStore
from services.common.store import AsyncS3Store, run_key

__all__ = [
    "SUBMIT",
    "SubmitResult",
    "cancel_run",
    "plan_key",
    "release_dependents",
    "retry_dead",
    "submit",
    "submit_with",
]

log = get_logger(__name__)

SUBMIT = "submit"
"""``released_by`` of root jobs."""

_MAX_CAS_ROUNDS = 100
# Requests in flight while submitting: enough to hide round trips, few enough to be polite.
_SUBMIT_CONCURRENCY = 64


class SubmitResult(BaseModel):
    """What ``submit`` did."""

    run_id: str
    created: bool  # False when the run existed (a resubmission)
    records_created: int
    published: int  # roots newly stored by the server (duplicates not counted)


def plan_key(run_id: str) -> str:
    """S3 key of a run's plan."""
    return run_key(run_id, "plan.json")


async def submit(
    plan: RunPlan,
    *,
    settings: NatsSettings | None = None,
    store: AsyncS3Store | None = None,
) -> SubmitResult:
    """Connect and ``submit_with``: store the plan, write the records, publish the roots."""
    cfg = settings or settings_mod.get(NatsSettings)
    async with connection(cfg, name="qsens-submit") as nc:
        return await submit_with(plan, js=nc.jetstream(), settings=cfg, store=store)


async def submit_with(
    plan: RunPlan,
    *,
    js: JetStreamContext,
    settings: NatsSettings | None = None,
    store: AsyncS3Store | None = None,
) -> SubmitResult:
    """Submit ``plan`` over an open connection; idempotent for the same plan."""
    cfg = settings or settings_mod.get(NatsSettings)
    s3 = store or AsyncS3Store()
    key = plan_key(plan.run_id)
    plan_doc: dict[str, Any] = plan.model_dump(mode="json")
    plan_doc["job_ids"] = [job.id for job in plan.jobs]
    if not await s3.put_json(key, plan_doc):
        stored = await s3.get_json(key)
        if (
            stored.get("spec_hash") != plan.spec_hash
            or stored.get("job_ids") != plan_doc["job_ids"]
        ):
            raise FailedPrecondition(
                f"run id {plan.run_id!r} is already used by a different plan "
                f"(spec {stored.get('spec_hash')}); choose another run id"
            )
    queue = JobQueue(js, cfg)
    await queue.ensure({job.kind for job in plan.jobs})
    state = await StateStore.open(js, cfg)
    run = RunRecord(
        run_id=plan.run_id,
        spec_hash=plan.spec_hash,
        description=plan.description,
        created_at=plan.created_at,
        job_count=len(plan.jobs),
        root_ids=tuple(job.id for job in plan.roots()),
        plan_key=key,
    )
    created = await state.create_run(run)
    if not created:
        existing = await state.get_run(plan.run_id)
        if existing.spec_hash != plan.spec_hash or existing.job_count != len(plan.jobs):
            raise FailedPrecondition(
                f"run {plan.run_id!r} exists with spec {existing.spec_hash} "
                f"and {existing.job_count} jobs; choose another run id"
            )
    dependents = plan.dependents()
    now = time.time()
    limit = asyncio.Semaphore(_SUBMIT_CONCURRENCY)

    async def create(job: Job) -> bool:
        root = not job.deps
        record = JobRecord(
            job=job,
            state=JobState.QUEUED if root else JobState.PENDING,
            dependents=dependents[job.id],
            released_by=SUBMIT if root else None,
            queued_at=now if root else None,
        )
        async with limit:
            return await state.create_job(record)

    async def publish_root(job: Job) -> bool:
        async with limit:
            current = await state.get_job(plan.run_id, job.id)
            return current.state == JobState.QUEUED and await queue.publish(job)

    # Every record before any message: a worker that receives a job must find its record,
    # and a dependent's record must exist before a root can finish and release it.
    records_created = sum(await asyncio.gather(*(create(job) for job in plan.jobs)))
    published = sum(await asyncio.gather(*(publish_root(job) for job in plan.roots())))
    log.info(
        "run submitted",
        extra={
            "run_id": plan.run_id,
            "jobs": len(plan.jobs),
            "roots": len(run.root_ids),
            "resubmitted": not created,
        },
    )
    return SubmitResult(
        run_id=plan.run_id, created=created, records_created=records_created, published=published
    )


async def release_dependents(record: JobRecord, *, state: StateStore, queue: JobQueue) -> list[str]:
    """Record ``record``'s job as done in each dependent; publish those it completes.

    Returns the ids of the dependents this call published (first time or re-publish after a
    crash, see the module docstring). Safe to call any number of times for a done job.
    """
    finished = record.job
    if record.state != JobState.DONE:
        raise FailedPrecondition(f"{finished.label} is {record.state.value}, not done")
    if not record.dependents:
        return []
    run = await state.get_run(finished.run_id)
    if run.cancelled:
        return []
    published: list[str] = []
    for dependent_id in record.dependents:
        to_publish = await _mark_dep_done(state, finished.run_id, dependent_id, finished.id)
        if to_publish is not None:
            await queue.publish(to_publish)
            published.append(dependent_id)
    if published:
        log.info(
            "dependents released",
            extra={"run_id": finished.run_id, "by": finished.id, "released": published},
        )
    return published


async def _mark_dep_done(
    state: StateStore, run_id: str, dependent_id: str, finished_id: str
) -> Job | None:
    """Add ``finished_id`` to the dependent's done deps; the job to publish, if ours to publish."""
    for _ in range(_MAX_CAS_ROUNDS):
        current, revision = await state.get_job_entry(run_id, dependent_id)
        if current.state != JobState.PENDING:
            # Queued by us before a crash: publish again (the server drops a duplicate).
            if current.state == JobState.QUEUED and current.released_by == finished_id:
                return current.job
            return None
        if finished_id in current.deps_done:
            return None
        done = set(current.deps_done) | {finished_id}
        if done >= set(current.job.deps):
            new = current.evolve(
                deps_done=tuple(sorted(done)),
                state=JobState.QUEUED,
                released_by=finished_id,
                queued_at=time.time(),
            )
        else:
            new = current.evolve(deps_done=tuple(sorted(done)))
        if await state.update_job(new, revision) is None:
            continue  # another finisher wrote first: re-read and decide again
        return new.job if new.state == JobState.QUEUED else None
    raise FailedPrecondition(f"job {dependent_id} of run {run_id}: too many concurrent updates")


async def cancel_run(run_id: str, *, state: StateStore) -> RunRecord:
    """Mark ``run_id`` cancelled: workers skip its queued jobs and release nothing more."""
    return await state.cancel_run(run_id)


async def retry_dead(run_id: str, job_id: str, *, state: StateStore, queue: JobQueue) -> JobRecord:
    """Put a dead-lettered job back on its queue with fresh attempt counters."""

    def change(r: JobRecord) -> JobRecord | None:
        if r.state != JobState.DEAD:
            raise FailedPrecondition(f"{r.job.label} is {r.state.value}, not dead")
        return r.evolve(
            state=JobState.QUEUED,
            retries=r.retries + 1,
            attempts=0,
            failures=0,
            unavailable=0,
            waiting=0,
            msg_seq=None,
            error=None,
            finished_at=None,
            queued_at=time.time(),
        )

    record = await state.mutate_job(run_id, job_id, change)
    # A new message id: the job's id is still inside the duplicate window.
    await queue.publish(record.job, msg_id=f"{record.job.id}-retry{record.retries}")
    return record
