"""Run and job state in JetStream KV: records, and compare-and-set updates of them.

Buckets (``<namespace>-runs``, ``<namespace>-jobs``):

* run record, key ``<run_id>``: spec hash, job count, roots, where the plan is stored, the
  cancelled flag. Counts are not stored: ``summary()`` derives them from the job records, so
  they can never drift from the truth.
* job record, key ``<run_id>.<job_id>``: the job spec, its dependents, its state
  (pending → queued → running → done, with failed/dead/cancelled), attempts, worker, timings,
  result summary and last error, plus the fan-in bookkeeping (``deps_done``, ``released_by``)
  that ``services.common.dag`` uses.

Every change goes through ``mutate_job``: read the record with its revision, compute the new
one, write it only if the revision is unchanged (``update(last=revision)``), else re-read and
retry. Two workers can therefore never both move a dependent from pending to queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Literal

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common import settings as settings_mod
from services.common.errors import NotFound, Unavailable
from services.common.jobs import Job, validate_run_id
from services.common.natsconn import PlaneNames, ensure_kv, kv_values
from services.common.settings import NatsSettings

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "JobRecord",
    "JobState",
    "RunRecord",
    "RunSummary",
    "StateStore",
]

_MAX_CAS_ROUNDS = 100


class JobState(StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"  # waiting for deps
    QUEUED = "queued"  # published, not yet picked up
    RUNNING = "running"  # a worker holds it
    FAILED = "failed"  # last attempt failed; it will be retried
    DONE = "done"  # results written, dependents released
    DEAD = "dead"  # in the dead-letter queue with its error
    CANCELLED = "cancelled"  # its run was cancelled before it ran


TERMINAL_STATES = frozenset({JobState.DONE, JobState.DEAD, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.FAILED})


class JobRecord(BaseModel):
    """The state of one job (KV key ``<run_id>.<job_id>``)."""

    model_config = ConfigDict(extra="ignore")

    job: Job = Field(description="The job spec.")
    state: JobState = Field(description="Current state.")
    dependents: tuple[str, ...] = Field(default=(), description="Jobs that wait for this one.")
    deps_done: tuple[str, ...] = Field(default=(), description="Deps known to be done.")
    released_by: str | None = Field(
        default=None, description="The dep whose completion queued this job ('submit' for roots)."
    )
    attempts: int = Field(default=0, ge=0, description="Deliveries so far of the current message.")
    failures: int = Field(default=0, ge=0, description="Attempts that raised or crashed.")
    unavailable: int = Field(default=0, ge=0, description="Attempts that found a loader missing.")
    waiting: int = Field(
        default=0,
        ge=0,
        description="Deliveries that found the loader announced but not ready (not attempts).",
    )
    retries: int = Field(default=0, ge=0, description="Manual requeues after the DLQ.")
    worker: str | None = Field(default=None, description="Worker that last ran it.")
    msg_seq: int | None = Field(
        default=None, description="Stream sequence of the message the job is running from."
    )
    queued_at: float | None = Field(default=None, description="Unix time it was published.")
    started_at: float | None = Field(default=None, description="Unix time of the last start.")
    finished_at: float | None = Field(default=None, description="Unix time it became terminal.")
    updated_at: float = Field(default_factory=time.time, description="Unix time of this revision.")
    result: dict[str, Any] | None = Field(default=None, description="Handler's result summary.")
    error: str | None = Field(default=None, description="Last error, 'Type: message'.")

    @property
    def job_id(self) -> str:
        return self.job.id

    def evolve(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` applied and ``updated_at`` set to now."""
        return self.model_copy(update={**changes, "updated_at": time.time()})


class RunRecord(BaseModel):
    """One run (KV key ``<run_id>``)."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    spec_hash: str
    description: str = ""
    created_at: float = Field(default_factory=time.time)
    job_count: int = Field(ge=0)
    root_ids: tuple[str, ...] = ()
    plan_key: str | None = Field(default=None, description="S3 key of the plan JSON.")
    cancelled: bool = False
    cancelled_at: float | None = None


class RunSummary(BaseModel):
    """Progress of a run, derived from its job records."""

    run_id: str
    total: int
    counts: dict[str, int]
    cancelled: bool
    status: Literal["running", "succeeded", "failed", "cancelled"]

    def count(self, state: JobState) -> int:
        return self.counts.get(state.value, 0)


def _job_key(run_id: str, job_id: str) -> str:
    return f"{run_id}.{job_id}"


class StateStore:
    """Typed access to the runs and jobs buckets of one namespace."""

    def __init__(self, runs: KeyValue, jobs: KeyValue, names: PlaneNames) -> None:
        self.runs = runs
        self.jobs = jobs
        self.names = names

    @classmethod
    async def open(cls, js: JetStreamContext, settings: NatsSettings | None = None) -> StateStore:
        """Open (creating if needed) the namespace's buckets."""
        cfg = settings or settings_mod.get(NatsSettings)
        names = PlaneNames(cfg.namespace)
        runs = await ensure_kv(
            js, names.runs_bucket, replicas=cfg.replicas, history=5, description="qsens runs"
        )
        jobs = await ensure_kv(
            js, names.jobs_bucket, replicas=cfg.replicas, history=5, description="qsens jobs"
        )
        return cls(runs, jobs, names)

    # -- runs -----------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> bool:
        """Store a new run record; False if the run exists already."""
        try:
            await self.runs.create(
                validate_run_id(record.run_id), record.model_dump_json().encode()
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def get_run(self, run_id: str) -> RunRecord:
        """The run record; NotFound if there is none."""
        record, _ = await self._get_run_entry(run_id)
        return record

    async def _get_run_entry(self, run_id: str) -> tuple[RunRecord, int]:
        try:
            entry = await self.runs.get(validate_run_id(run_id))
        except nats.js.errors.KeyNotFoundError:
            raise NotFound(f"no run {run_id!r} in namespace {self.names.namespace!r}") from None
        assert entry.value is not None and entry.revision is not None
        return RunRecord.model_validate_json(entry.value), entry.revision

    async def cancel_run(self, run_id: str) -> RunRecord:
        """Mark the run cancelled; workers skip its jobs from now on."""
        for _ in range(_MAX_CAS_ROUNDS):
            record, revision = await self._get_run_entry(run_id)
            if record.cancelled:
                return record
            new = record.model_copy(update={"cancelled": True, "cancelled_at": time.time()})
            try:
                await self.runs.update(run_id, new.model_dump_json().encode(), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return new
        raise Unavailable(f"run {run_id}: too many concurrent updates")

    async def list_runs(self) -> list[RunRecord]:
        """Every run record of the namespace, oldest first."""
        records = [RunRecord.model_validate_json(v) for v in await kv_values(self.runs, ">")]
        return sorted(records, key=lambda r: r.created_at)

    # -- jobs -----------------------------------------------------------------------------

    async def create_job(self, record: JobRecord) -> bool:
        """Store a new job record; False if it exists already."""
        key = _job_key(record.job.run_id, record.job.id)
        try:
            await self.jobs.create(key, record.model_dump_json().encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def get_job_entry(self, run_id: str, job_id: str) -> tuple[JobRecord, int]:
        """The job record and its revision; NotFound if there is none."""
        try:
            entry = await self.jobs.get(_job_key(validate_run_id(run_id), job_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            raise NotFound(f"no job {job_id!r} in run {run_id!r}") from None
        assert entry.value is not None and entry.revision is not None
        return JobRecord.model_validate_json(entry.value), entry.revision

    async def get_job(self, run_id: str, job_id: str) -> JobRecord:
        record, _ = await self.get_job_entry(run_id, job_id)
        return record

    async def update_job(self, record: JobRecord, revision: int) -> int | None:
        """Write ``record`` if the stored revision is still ``revision``; None if it moved on."""
        key = _job_key(record.job.run_id, record.job.id)
        try:
            return await self.jobs.update(key, record.model_dump_json().encode(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def mutate_job(
        self,
        run_id: str,
        job_id: str,
        change: Callable[[JobRecord], JobRecord | None],
        *,
        known: tuple[JobRecord, int] | None = None,
    ) -> JobRecord:
        """Apply ``change`` by compare-and-set, retrying on conflicts; returns the stored record.

        ``change`` gets the current record and returns the new one, or None to leave it as is.
        It may run several times, so it must not have side effects.
        """
        record, _ = await self.mutate_job_entry(run_id, job_id, change, known=known)
        return record

    async def mutate_job_entry(
        self,
        run_id: str,
        job_id: str,
        change: Callable[[JobRecord], JobRecord | None],
        *,
        known: tuple[JobRecord, int] | None = None,
    ) -> tuple[JobRecord, int]:
        """``mutate_job`` returning the revision too; ``known`` (a record and its revision
        read earlier) saves the first read, and is re-read only if it turns out stale."""
        entry = known
        for _ in range(_MAX_CAS_ROUNDS):
            record, revision = entry or await self.get_job_entry(run_id, job_id)
            entry = None
            new = change(record)
            if new is None:
                return record, revision
            written = await self.update_job(new, revision)
            if written is not None:
                return new, written
        raise Unavailable(f"job {job_id} of run {run_id}: too many concurrent updates")

    async def list_jobs(self, run_id: str) -> list[JobRecord]:
        """Every job record of the run (server-side filtered by key prefix)."""
        records: list[JobRecord] = []
        for value in await kv_values(self.jobs, f"{validate_run_id(run_id)}.*"):
            try:
                records.append(JobRecord.model_validate_json(value))
            except ValidationError:
                continue
        return records

    async def summary(self, run_id: str) -> RunSummary:
        """Counts per state and the run's overall status."""
        run = await self.get_run(run_id)
        records = await self.list_jobs(run_id)
        counts = {state.value: 0 for state in JobState}
        for record in records:
            counts[record.state.value] += 1
        # Records are written before the roots are published, but a run whose submission was
        # interrupted can have fewer; the missing ones count as pending.
        counts[JobState.PENDING.value] += max(0, run.job_count - len(records))
        active = sum(counts[s.value] for s in ACTIVE_STATES)
        status: Literal["running", "succeeded", "failed", "cancelled"]
        if run.cancelled:
            status = "cancelled"
        elif counts[JobState.DONE.value] == run.job_count:
            status = "succeeded"
        elif counts[JobState.DEAD.value] and not active:
            status = "failed"
        else:
            status = "running"
        return RunSummary(
            run_id=run_id,
            total=run.job_count,
            counts=counts,
            cancelled=run.cancelled,
            status=status,
        )
