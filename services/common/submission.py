"""Submitting a run as ``qsens run`` does: check everything first, and leave nothing behind on failure.

Order: plan the spec; connect to NATS; check that every job record and the run record fit in
one NATS message (with room to grow while the job runs) and that the run id is free or holds
this very plan; only then write ``spec.json`` and submit the DAG (``services.common.dag``,
which writes ``plan.json``, the records, and publishes the roots). The spec and plan live in S3
and only job params travel over NATS; the spec's own size bound (``MAX_SPEC_BYTES``) keeps the
one job that carries the whole spec (analyze) well inside a message, and the check here covers
the rest (e.g. an analyze job depending on a very large number of jobs).

When a fresh submit fails part-way before any job could have been published, what it wrote is
removed (``spec.json``, ``plan.json``, the run and job records), so the run id can be used
again, with this spec or another. A resubmit of the same plan is left as it is: submitting it
again finishes it (the DAG submit is idempotent). What older submits left when they failed
(objects without a run record, or a run record whose job records were never all written,
``ABANDONED_S`` ago) no longer holds the run id either.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nats.js import JetStreamContext

from services.common import settings as settings_mod
from services.common.dag import plan_key, submit_with
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jobs import JobKind, RunPlan
from services.common.logging import get_logger
from services.common.natsconn import connection
from services.common.planner import build_plan, new_run_id
from services.common.settings import NatsSettings
from services.common.spec import ExperimentSpec
from services.common.state import JobRecord, JobState, RunRecord, StateStore
from services.common.store import AsyncS3Store, run_key

__all__ = ["ABANDONED_S", "RECORD_HEADROOM", "check_payloads", "submit_run", "undo_submit"]

log = get_logger(__name__)

#: Bytes a job record keeps free for what it gains while it runs (attempts, worker, error
#: text, the handler's result summary): this much, or a quarter of a smaller server's limit.
RECORD_HEADROOM = 64 * 1024

#: A run record older than this whose job records were never all written is an abandoned
#: submit (it crashed half-way), not one still in progress: its run id may be taken over.
ABANDONED_S = 600.0

# The spec field that makes a job of each kind large (analyze carries the whole spec).
_FIELD = {
    JobKind.ANALYZE: "spec",
    JobKind.EXTRACT: "traits",
    JobKind.STEER: "steering",
    JobKind.LOGIT_DIFF: "logit_diff",
    JobKind.BENCHMARK: "benchmarks",
    JobKind.PROBE: "probes",
    JobKind.QUANTIZE: "quantize",
}


def check_payloads(plan: RunPlan, max_payload: int) -> None:
    """InvalidArgument naming the spec field when a record or message of ``plan`` would not
    fit in ``max_payload`` bytes (the NATS server's limit) less ``RECORD_HEADROOM``."""
    headroom = min(RECORD_HEADROOM, max_payload // 4)
    limit = max_payload - headroom
    dependents = plan.dependents()
    for job in plan.jobs:
        record = JobRecord(
            job=job,
            state=JobState.PENDING,
            dependents=dependents[job.id],
            deps_done=job.deps,  # the most it will list
            released_by=job.id,
        )
        size = len(record.model_dump_json().encode())
        if size > limit:
            raise InvalidArgument(
                _FIELD.get(job.kind, "spec"),
                f"job {job.name or job.kind.value!r} would need a {size}-byte record; NATS "
                f"carries at most {max_payload} bytes per message and a record keeps "
                f"{headroom} free while the job runs; make the spec smaller (fewer "
                "models, traits or listed values, a shorter description)",
            )
    run = _run_record(plan)
    size = len(run.model_dump_json().encode())
    if size > limit:
        raise InvalidArgument(
            "spec",
            f"the run record would be {size} bytes, over the {limit} NATS allows here; "
            "make the spec smaller (fewer models or traits, a shorter description)",
        )


def _run_record(plan: RunPlan) -> RunRecord:
    return RunRecord(
        run_id=plan.run_id,
        spec_hash=plan.spec_hash,
        description=plan.description,
        created_at=plan.created_at,
        job_count=len(plan.jobs),
        root_ids=tuple(job.id for job in plan.roots()),
        plan_key=plan_key(plan.run_id),
    )


async def _existing(state: StateStore, plan: RunPlan, store: AsyncS3Store) -> bool:
    """True when the run id already holds this plan (a resubmit); FailedPrecondition when it
    holds another; False when it is free, or held by a submit that failed half-way (before
    this module undid such failures) more than ``ABANDONED_S`` ago, which is removed."""
    try:
        run = await state.get_run(plan.run_id)
    except NotFound:
        return False
    if run.spec_hash != plan.spec_hash or run.job_count != len(plan.jobs):
        records = await state.list_jobs(plan.run_id)
        if len(records) < run.job_count and time.time() - run.created_at > ABANDONED_S:
            log.info("removing an abandoned half-made run", extra={"run_id": plan.run_id})
            await _remove(state, store, plan.run_id, records)
            return False
        raise FailedPrecondition(
            f"run id {plan.run_id!r} is already used by another run (spec {run.spec_hash}, "
            f"{run.job_count} jobs); choose another run id"
        )
    return True


async def _clear_leftovers(store: AsyncS3Store, spec: ExperimentSpec, plan: RunPlan) -> None:
    """Delete a ``spec.json``/``plan.json`` that differs from this submit's under a run id
    with no run record: the leftovers of a submit that failed before it made one (nothing
    uses them), which would otherwise hold the run id forever (S3 objects are write-once)."""
    rid = plan.run_id
    spec_key = run_key(rid, "spec.json")
    stale = False
    if await store.exists(spec_key):
        stale = await store.get_json(spec_key) != spec.model_dump(mode="json")
    if not stale and await store.exists(plan_key(rid)):
        stored = await store.get_json(plan_key(rid))
        stale = stored.get("spec_hash") != plan.spec_hash or stored.get("job_ids") != [
            job.id for job in plan.jobs
        ]
    if stale:
        log.info("removing a failed submit's leftovers", extra={"run_id": rid})
        await asyncio.to_thread(store.sync.delete, [spec_key, plan_key(rid)])


async def undo_submit(
    plan: RunPlan, js: JetStreamContext, store: AsyncS3Store, settings: NatsSettings
) -> bool:
    """Remove what a failed fresh submit of ``plan`` wrote, unless every job record exists
    (roots may have been published; submitting again finishes the run). True when removed."""
    state = await StateStore.open(js, settings)
    rid = plan.run_id
    records: list[JobRecord] = []
    with contextlib.suppress(NotFound):
        await state.get_run(rid)
        records = await state.list_jobs(rid)
        if len(records) >= len(plan.jobs):
            return False
    await _remove(state, store, rid, records)
    return True


async def _remove(
    state: StateStore, store: AsyncS3Store, rid: str, records: list[JobRecord]
) -> None:
    """Purge a run's job records and run record, and delete its spec.json and plan.json."""
    for record in records:
        await state.jobs.purge(f"{rid}.{record.job.id}")
    with contextlib.suppress(Exception):  # no run record: nothing to purge
        await state.runs.purge(rid)
    await asyncio.to_thread(store.sync.delete, [run_key(rid, "spec.json"), plan_key(rid)])


async def submit_run(
    spec: ExperimentSpec,
    run_id: str | None = None,
    *,
    store: AsyncS3Store | None = None,
    settings: NatsSettings | None = None,
) -> str:
    """Plan ``spec`` and submit it under ``run_id`` (default: a new one); returns the run id."""
    rid = run_id or new_run_id(spec)
    plan = build_plan(spec, rid)
    cfg = settings or settings_mod.get(NatsSettings)
    s3 = store or AsyncS3Store()
    async with connection(cfg, name="qsens-submit") as nc:
        check_payloads(plan, int(nc.max_payload))
        js = nc.jetstream()
        resubmit = await _existing(await StateStore.open(js, cfg), plan, s3)
        await s3.ensure_bucket()
        if not resubmit:
            await _clear_leftovers(s3, spec, plan)
        try:
            await s3.put_json(run_key(rid, "spec.json"), spec.model_dump(mode="json"))
            await submit_with(plan, js=js, settings=cfg, store=s3)
        except BaseException as err:
            if not resubmit:
                await _undo_quietly(plan, js, s3, cfg, err)
            raise
    return rid


async def _undo_quietly(
    plan: RunPlan, js: JetStreamContext, s3: AsyncS3Store, cfg: NatsSettings, err: BaseException
) -> None:
    """``undo_submit``, logged; a failure to undo must not hide the error that caused it."""
    extra: dict[str, Any] = {"run_id": plan.run_id, "error": repr(err)}
    try:
        removed = await undo_submit(plan, js, s3, cfg)
    except Exception as undo_err:
        log.warning("failed submit not undone", extra={**extra, "undo_error": repr(undo_err)})
        return
    log.info("failed submit undone" if removed else "failed submit kept", extra=extra)
