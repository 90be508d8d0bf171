"""Fan-in release and submission: exactly once under concurrency, redelivery and crashes."""

from __future__ import annotations

import asyncio

import pytest

from services.common.dag import SUBMIT, release_dependents, submit, submit_with
from services.common.errors import FailedPrecondition
from services.common.jobs import Job, JobKind, RunPlan
from services.common.natsconn import connection
from services.common.queue import JobQueue
from services.common.state import JobRecord, JobState, StateStore
from tests.common.plane import Plane, open_plane
from tests.conftest import PlaneEnv


class CountingQueue(JobQueue):
    """Counts publishes per job id; ``crash_on`` makes the first publish of that id fail."""

    def __init__(self, base: JobQueue, crash_on: str | None = None) -> None:
        super().__init__(base.js, base.settings)
        self.published: list[str] = []
        self.crash_on = crash_on

    async def publish(self, job: Job, *, msg_id: str | None = None) -> bool:
        if job.id == self.crash_on:
            self.crash_on = None
            raise ConnectionError("worker died before publishing")
        self.published.append(job.id)
        return await super().publish(job, msg_id=msg_id)


def fan_in(run_id: str, width: int) -> tuple[RunPlan, list[Job], Job]:
    roots = [Job(kind=JobKind.NOOP, run_id=run_id, params={"n": i}) for i in range(width)]
    join = Job(
        kind=JobKind.ANALYZE, run_id=run_id, params={"join": True}, deps=[r.id for r in roots]
    )
    return RunPlan(run_id=run_id, spec_hash="fan", jobs=[*roots, join]), roots, join


async def mark_done(state: StateStore, job: Job) -> JobRecord:
    return await state.mutate_job(job.run_id, job.id, lambda r: r.evolve(state=JobState.DONE))


async def analyze_messages(plane: Plane) -> int:
    return await plane.queue.depth(JobKind.ANALYZE)


async def test_concurrent_finishers_release_a_fan_in_exactly_once(
    plane_env: PlaneEnv, run_id: str
) -> None:
    plan, roots, join = fan_in(run_id, 12)
    async with open_plane() as plane:
        await submit(plan)
        records = [await mark_done(plane.state, r) for r in roots]
        # Every finisher on its own connection, all at once.
        queues: list[CountingQueue] = []

        async def finisher(record: JobRecord) -> None:
            async with connection(name="finisher") as nc:
                js = nc.jetstream()
                queue = CountingQueue(JobQueue(js))
                queues.append(queue)
                await release_dependents(record, state=await StateStore.open(js), queue=queue)

        await asyncio.gather(*(finisher(r) for r in records))
        assert [job_id for q in queues for job_id in q.published] == [join.id]
        stored = await plane.state.get_job(run_id, join.id)
        assert stored.state == JobState.QUEUED
        assert set(stored.deps_done) == {r.id for r in roots}
        assert stored.released_by in {r.id for r in roots}
        assert await analyze_messages(plane) == 1
        # Every finisher's message redelivered: only the one that queued the join publishes
        # again (it cannot know whether it had), and the server stores nothing new.
        queues.clear()
        await asyncio.gather(*(finisher(r) for r in records))
        assert [job_id for q in queues for job_id in q.published] == [join.id]
        assert await analyze_messages(plane) == 1


async def test_dependent_waits_for_every_dep(plane_env: PlaneEnv, run_id: str) -> None:
    plan, roots, join = fan_in(run_id, 3)
    async with open_plane() as plane:
        await submit(plan)
        for root in roots[:2]:
            record = await mark_done(plane.state, root)
            assert await release_dependents(record, state=plane.state, queue=plane.queue) == []
        waiting = await plane.state.get_job(run_id, join.id)
        assert waiting.state == JobState.PENDING
        assert set(waiting.deps_done) == {roots[0].id, roots[1].id}
        last = await mark_done(plane.state, roots[2])
        assert await release_dependents(last, state=plane.state, queue=plane.queue) == [join.id]


async def test_crash_between_queueing_and_publishing_is_repaired_by_redelivery(
    plane_env: PlaneEnv, run_id: str
) -> None:
    plan, roots, join = fan_in(run_id, 2)
    async with open_plane() as plane:
        await submit(plan)
        first = await mark_done(plane.state, roots[0])
        await release_dependents(first, state=plane.state, queue=plane.queue)
        second = await mark_done(plane.state, roots[1])
        crashing = CountingQueue(plane.queue, crash_on=join.id)
        with pytest.raises(ConnectionError):
            await release_dependents(second, state=plane.state, queue=crashing)
        stuck = await plane.state.get_job(run_id, join.id)
        assert stuck.state == JobState.QUEUED and stuck.released_by == roots[1].id
        assert await analyze_messages(plane) == 0
        # The other dep's redelivery must not publish it: it did not queue it.
        other = CountingQueue(plane.queue)
        await release_dependents(first, state=plane.state, queue=other)
        assert other.published == []
        # The finisher's own redelivery (its job is done) publishes it, once.
        retry = CountingQueue(plane.queue)
        await release_dependents(second, state=plane.state, queue=retry)
        await release_dependents(second, state=plane.state, queue=retry)
        assert retry.published == [join.id, join.id]  # the second is dropped by the server
        assert await analyze_messages(plane) == 1


async def test_submit_is_idempotent_and_refuses_a_different_plan(
    plane_env: PlaneEnv, run_id: str
) -> None:
    plan, roots, join = fan_in(run_id, 3)
    async with open_plane() as plane:
        first = await submit_with(plan, js=plane.js)
        assert first.created and first.records_created == 4 and first.published == 3
        again = await submit_with(plan, js=plane.js)
        assert not again.created and again.records_created == 0 and again.published == 0
        assert await plane.queue.depth(JobKind.NOOP) == 3
        root = await plane.state.get_job(run_id, roots[0].id)
        assert root.state == JobState.QUEUED and root.released_by == SUBMIT
        assert root.dependents == (join.id,)
        stored_plan = plane.store.get_json(f"runs/{run_id}/plan.json")
        assert stored_plan["job_ids"] == [j.id for j in plan.jobs]
        other = RunPlan(run_id=run_id, spec_hash="another", jobs=roots)
        with pytest.raises(FailedPrecondition, match="different plan"):
            await submit_with(other, js=plane.js)


async def test_release_refuses_a_job_that_is_not_done(plane_env: PlaneEnv, run_id: str) -> None:
    plan, roots, _ = fan_in(run_id, 2)
    async with open_plane() as plane:
        await submit(plan)
        queued = await plane.state.get_job(run_id, roots[0].id)
        with pytest.raises(FailedPrecondition, match="not done"):
            await release_dependents(queued, state=plane.state, queue=plane.queue)


async def test_list_runs_returns_every_run_oldest_first(plane_env: PlaneEnv) -> None:
    async with open_plane() as plane:
        assert await plane.state.list_runs() == []
        for i in range(3):
            plan, _, _ = fan_in(f"listed-{i}", 1)
            await submit_with(plan, js=plane.js)
        runs = await plane.state.list_runs()
        assert [r.run_id for r in runs] == ["listed-0", "listed-1", "listed-2"]
        assert [r.job_count for r in runs] == [2, 2, 2]
