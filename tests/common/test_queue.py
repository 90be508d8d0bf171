"""The worker runtime against real NATS + S3: completion, retries, the DLQ, heartbeats."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.common import settings as settings_mod
from services.common.dag import cancel_run, retry_dead, submit
from services.common.errors import FailedPrecondition
from services.common.handlers import JobContext
from services.common.jobs import Job, JobKind, RunPlan
from services.common.loader_registry import LoaderRegistry
from services.common.state import JobState
from services.common.store import S3Store
from tests.common.handlers import behave
from tests.common.plane import open_plane, wait_status, worker
from tests.conftest import PlaneEnv


def executions(store: S3Store, run_id: str, job: Job) -> int:
    return len(store.list_keys(f"runs/{run_id}/executions/{job.id}/"))


def noop(run_id: str, **params: object) -> Job:
    return Job(kind=JobKind.NOOP, run_id=run_id, params=dict(params))


async def test_fan_in_run_completes_with_each_job_run_once(
    plane_env: PlaneEnv, run_id: str
) -> None:
    roots = [noop(run_id, n=i) for i in range(6)]
    join = Job(kind=JobKind.NOOP, run_id=run_id, params={"join": 1}, deps=[j.id for j in roots])
    tail = Job(kind=JobKind.ANALYZE, run_id=run_id, params={"tail": 1}, deps=[join.id])
    plan = RunPlan(run_id=run_id, spec_hash="fan-in", jobs=[*roots, join, tail])
    async with open_plane() as plane:
        await submit(plan)
        kinds = (JobKind.NOOP, JobKind.ANALYZE)
        async with worker(behave, kinds, concurrency=3), worker(behave, kinds, concurrency=3):
            summary = await wait_status(plane.state, run_id, ["succeeded", "failed"])
        assert summary.status == "succeeded"
        assert summary.count(JobState.DONE) == 8
        for job in plan.jobs:
            assert executions(plane.store, run_id, job) == 1, job.params
        joined = await plane.state.get_job(run_id, join.id)
        assert set(joined.deps_done) == {j.id for j in roots}
        assert joined.released_by in {j.id for j in roots}
        assert (await plane.state.get_job(run_id, tail.id)).result == {"ok": True, "attempt": 1}
        assert await plane.queue.depth(JobKind.NOOP) == 0
        assert await plane.queue.dead_letters() == []


async def test_a_job_that_keeps_failing_lands_in_the_dlq(plane_env: PlaneEnv, run_id: str) -> None:
    bad = noop(run_id, do="fail")
    after = Job(kind=JobKind.NOOP, run_id=run_id, params={"after": 1}, deps=[bad.id])
    plan = RunPlan(run_id=run_id, spec_hash="fail", jobs=[bad, after])
    async with open_plane() as plane:
        await submit(plan)
        async with worker(behave) as task:
            summary = await wait_status(plane.state, run_id, ["failed"])
        assert task.result().dead == 1
        assert task.result().retried == 2  # QSENS_NATS_MAX_DELIVER=3
        (letter,) = await plane.queue.dead_letters(JobKind.NOOP)
        assert letter.job_id == bad.id
        assert letter.error_type == "RuntimeError"
        assert letter.error == "boom on attempt 3"
        assert letter.attempts == 3
        assert letter.job is not None and letter.job["params"] == {"do": "fail"}
        record = await plane.state.get_job(run_id, bad.id)
        assert record.state == JobState.DEAD
        assert record.error == "RuntimeError: boom on attempt 3"
        assert summary.count(JobState.PENDING) == 1  # its dependent is never released
        assert executions(plane.store, run_id, after) == 0
        assert await plane.queue.depth(JobKind.NOOP) == 0


async def test_malformed_message_is_dead_lettered_and_the_worker_keeps_serving(
    plane_env: PlaneEnv, run_id: str
) -> None:
    good = noop(run_id, n=1)
    async with open_plane() as plane:
        subject = plane.queue.names.job_subject(JobKind.NOOP)
        await plane.js.publish(subject, b"{this is not json", headers={"Nats-Msg-Id": "junk-1"})
        await plane.js.publish(
            subject, b'{"kind": "steer", "run_id": "x"}', headers={"Nats-Msg-Id": "junk-2"}
        )
        async with worker(behave) as task:
            await asyncio.sleep(0.5)
            await submit(RunPlan(run_id=run_id, spec_hash="ok", jobs=[good]))
            await wait_status(plane.state, run_id, ["succeeded"])
        assert task.result().dead == 2
        assert task.result().done == 1
        junk, wrong_kind = await plane.queue.dead_letters()
        assert junk.raw == "{this is not json"
        assert junk.job is None
        assert junk.error_type == "InvalidArgument"
        assert junk.attempts == 1
        assert "steer" in wrong_kind.error and wrong_kind.error_type == "InvalidArgument"


async def test_invalid_argument_is_dead_lettered_at_once(plane_env: PlaneEnv, run_id: str) -> None:
    job = noop(run_id, do="invalid")
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="inv", jobs=[job]))
        async with worker(behave):
            await wait_status(plane.state, run_id, ["failed"])
        (letter,) = await plane.queue.dead_letters()
        assert letter.attempts == 1
        assert letter.error == "params.do: this job can never work"
        assert executions(plane.store, run_id, job) == 1


async def test_missing_loader_is_retried_until_one_is_announced(
    plane_env: PlaneEnv, run_id: str
) -> None:
    job = noop(run_id, do="loader", variant="tiny@nf4")
    async with open_plane() as plane:
        registry = await LoaderRegistry.open(plane.js)
        await submit(RunPlan(run_id=run_id, spec_hash="loader", jobs=[job]))
        async with worker(behave):
            deadline = time.monotonic() + 20  # QSENS_NATS_UNAVAILABLE_DELAY_S=0.2 in tests
            while (await plane.state.get_job(run_id, job.id)).unavailable < 2:
                assert time.monotonic() < deadline, "the job was not retried"
                await asyncio.sleep(0.1)
            waiting = await plane.state.get_job(run_id, job.id)
            assert waiting.state == JobState.FAILED
            assert waiting.unavailable >= 2
            assert waiting.error is not None and "tiny@nf4" in waiting.error
            announcement = await registry.announce("tiny@nf4", "127.0.0.1:7777")
            await wait_status(plane.state, run_id, ["succeeded"])
            await announcement.stop()
        done = await plane.state.get_job(run_id, job.id)
        assert done.result == {"address": "127.0.0.1:7777"}
        assert await plane.queue.dead_letters() == []


async def test_heartbeats_keep_a_job_longer_than_ack_wait(
    plane_env: PlaneEnv, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QSENS_NATS_ACK_WAIT_S", "0.6")
    settings_mod.reset()
    job = noop(run_id, do="sleep", seconds=2.0)
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="long", jobs=[job]))
        async with worker(behave, concurrency=2):
            await wait_status(plane.state, run_id, ["succeeded"])
        record = await plane.state.get_job(run_id, job.id)
        assert record.attempts == 1
        assert executions(plane.store, run_id, job) == 1


async def test_cancelled_run_is_skipped(plane_env: PlaneEnv, run_id: str) -> None:
    first = noop(run_id, n=1)
    second = Job(kind=JobKind.NOOP, run_id=run_id, params={"n": 2}, deps=[first.id])
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="c", jobs=[first, second]))
        await cancel_run(run_id, state=plane.state)
        async with worker(behave) as task:
            await wait_status(plane.state, run_id, ["cancelled"])
            deadline = asyncio.get_running_loop().time() + 5
            while (await plane.state.get_job(run_id, first.id)).state != JobState.CANCELLED:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
        assert task.result().skipped == 1
        assert executions(plane.store, run_id, first) == 0
        assert (await plane.state.get_job(run_id, second.id)).state == JobState.PENDING
        assert await plane.queue.depth(JobKind.NOOP) == 0


async def test_a_job_done_before_a_crash_is_not_run_again(plane_env: PlaneEnv, run_id: str) -> None:
    first = noop(run_id, n=1)
    second = Job(kind=JobKind.NOOP, run_id=run_id, params={"n": 2}, deps=[first.id])
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="d", jobs=[first, second]))
        # A worker marked `first` done and died before releasing and acking: its message
        # is still in the queue.
        await plane.state.mutate_job(
            run_id, first.id, lambda r: r.evolve(state=JobState.DONE, result={"earlier": 1})
        )
        async with worker(behave) as task:
            await wait_status(plane.state, run_id, ["succeeded"])
        assert executions(plane.store, run_id, first) == 0
        assert executions(plane.store, run_id, second) == 1
        assert (await plane.state.get_job(run_id, first.id)).result == {"earlier": 1}
        assert task.result().skipped == 1
        assert await plane.queue.depth(JobKind.NOOP) == 0


async def test_publishing_a_job_twice_stores_it_once(plane_env: PlaneEnv, run_id: str) -> None:
    job = noop(run_id, n=1)
    async with open_plane() as plane:
        assert await plane.queue.publish(job) is True
        assert await plane.queue.publish(job) is False
        assert await plane.queue.depth(JobKind.NOOP) == 1


async def test_a_dead_job_can_be_retried_by_hand(plane_env: PlaneEnv, run_id: str) -> None:
    bad = noop(run_id, do="fail")
    after = Job(kind=JobKind.NOOP, run_id=run_id, params={"after": 1}, deps=[bad.id])
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="retry", jobs=[bad, after]))
        async with worker(behave):
            await wait_status(plane.state, run_id, ["failed"])

        async def fixed(job: Job, ctx: JobContext) -> dict[str, Any]:
            return {"fixed": True}

        record = await retry_dead(run_id, bad.id, state=plane.state, queue=plane.queue)
        assert record.state == JobState.QUEUED and record.retries == 1
        with pytest.raises(FailedPrecondition, match="not dead"):
            await retry_dead(run_id, bad.id, state=plane.state, queue=plane.queue)
        async with worker(fixed):
            await wait_status(plane.state, run_id, ["succeeded"])
        assert (await plane.state.get_job(run_id, bad.id)).result == {"fixed": True}
        assert (await plane.state.get_job(run_id, after.id)).result == {"fixed": True}


async def test_a_job_whose_workers_keep_dying_lands_in_the_dlq(
    plane_env: PlaneEnv, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QSENS_NATS_ACK_WAIT_S", "0.5")
    settings_mod.reset()
    job = noop(run_id, n=1)
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="dying", jobs=[job]))
        names = plane.queue.names
        sub = await plane.js.pull_subscribe_bind(
            durable=names.consumer(JobKind.NOOP), stream=names.job_stream(JobKind.NOOP)
        )
        # Three "workers" take the job and die: no ack, no nak, no heartbeat.
        for delivery in (1, 2, 3):
            (msg,) = await sub.fetch(1, timeout=5)
            assert msg.metadata.num_delivered == delivery
        await sub.unsubscribe()
        async with worker(behave) as task:
            await wait_status(plane.state, run_id, ["failed"])
        assert task.result().dead == 1
        (letter,) = await plane.queue.dead_letters()
        assert letter.attempts == 3
        assert letter.error == "gave up after 3 attempts: worker died or missed its heartbeats"
        assert executions(plane.store, run_id, job) == 0
