"""How a worker takes jobs across kinds, against a real nats-server (and S3 for the jobs).

The worker serves the steerer's four kinds at concurrency 1 with the default long-poll time
(``fetch_wait_s`` = 5 s): a worker that waits on each empty kind's queue before the busy one
takes about 15 s per job here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.msg import Msg

from services.common import dispatch, localstack
from services.common import settings as settings_mod
from services.common.dag import submit
from services.common.jobs import Job, JobKind, RunPlan
from services.common.settings import NatsSettings
from services.common.state import JobState
from tests.common.handlers import behave
from tests.common.plane import Plane, open_plane, wait_status, worker
from tests.conftest import PlaneEnv

STEERER_KINDS = (JobKind.BENCHMARK, JobKind.LOGIT_DIFF, JobKind.PROBE, JobKind.STEER)
BUSY = STEERER_KINDS[-1]


@pytest.fixture
def default_fetch_wait(plane_env: PlaneEnv, monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.delenv("QSENS_NATS_FETCH_WAIT_S")
    settings_mod.reset()
    wait = settings_mod.get(NatsSettings).fetch_wait_s
    assert wait == 5.0
    return wait


def jobs_of(run_id: str, kind: JobKind, count: int, **params: object) -> list[Job]:
    return [Job(kind=kind, run_id=run_id, params={"i": i, **params}) for i in range(count)]


async def warm_up(plane: Plane, run_id: str) -> None:
    """Until the worker has run one job: it is connected and serving."""
    job = Job(kind=BUSY, run_id=run_id, params={"warm": 1})
    await submit(RunPlan(run_id=run_id, spec_hash="warm", jobs=[job]))
    await wait_status(plane.state, run_id, ["succeeded"], timeout_s=30)


async def test_a_four_kind_worker_runs_a_busy_kind_as_fast_as_a_one_kind_worker(
    plane_env: PlaneEnv, run_id: str, default_fetch_wait: float
) -> None:
    count = 8
    plan = RunPlan(run_id=run_id, spec_hash="busy", jobs=jobs_of(run_id, BUSY, count))
    async with open_plane() as plane, worker(behave, STEERER_KINDS, concurrency=1) as task:
        # The jobs arrive at a worker that is serving and has found every queue empty.
        await warm_up(plane, run_id + "w")
        await asyncio.sleep(0.5)
        submitted = time.time()
        await submit(plan)
        await wait_status(plane.state, run_id, ["succeeded"], timeout_s=1.5 * count)
        records = await plane.state.list_jobs(run_id)
    assert task.result().done == 1 + count
    finished = sorted(r.finished_at or 0.0 for r in records)
    mean_s = (finished[-1] - submitted) / count
    assert mean_s < 1.5, f"{mean_s:.2f} s per job"
    # No job waited out a long poll on an empty queue, the first one included.
    gaps = [b - a for a, b in itertools.pairwise([submitted, *finished])]
    assert max(gaps) < default_fetch_wait / 2, gaps


async def test_kinds_are_served_in_turn_so_none_starves(
    plane_env: PlaneEnv, run_id: str, default_fetch_wait: float
) -> None:
    per_kind = 3
    jobs = [j for kind in STEERER_KINDS for j in jobs_of(run_id, kind, per_kind)]
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="fair", jobs=jobs))
        async with worker(behave, STEERER_KINDS, concurrency=1):
            await wait_status(plane.state, run_id, ["succeeded"], timeout_s=20)
        records = await plane.state.list_jobs(run_id)
    order = [r.job.kind for r in sorted(records, key=lambda r: r.started_at or 0.0)]
    # A full queue of each kind: every run of four consecutive jobs has one of each.
    for window in itertools.pairwise(range(0, len(order) + 1, len(STEERER_KINDS))):
        assert sorted(order[slice(*window)]) == sorted(STEERER_KINDS), order


async def test_a_busy_worker_pulls_nothing_it_cannot_start(
    plane_env: PlaneEnv, run_id: str, default_fetch_wait: float
) -> None:
    long = Job(kind=JobKind.STEER, run_id=run_id, params={"do": "sleep", "seconds": 3.0})
    more = RunPlan(
        run_id=run_id + "b", spec_hash="more", jobs=jobs_of(run_id + "b", JobKind.PROBE, 3)
    )
    async with open_plane() as plane:
        names = plane.queue.names
        await submit(RunPlan(run_id=run_id, spec_hash="long", jobs=[long]))
        async with worker(behave, STEERER_KINDS, concurrency=1) as task:
            deadline = time.monotonic() + 10
            while (await plane.state.get_job(run_id, long.id)).state != JobState.RUNNING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await submit(more)
            # While its one slot is busy, the worker leaves the probe jobs to others: none
            # is delivered to it, none waits unacked.
            for _ in range(10):
                info = await plane.js.consumer_info(
                    names.job_stream(JobKind.PROBE), names.consumer(JobKind.PROBE)
                )
                assert info.num_ack_pending == 0 and info.num_pending == 3, info
                await asyncio.sleep(0.2)
            assert (await plane.state.get_job(run_id, long.id)).state == JobState.RUNNING
            await wait_status(plane.state, more.run_id, ["succeeded"], timeout_s=15)
        assert task.result().done == 1 + len(more.jobs)
        assert (await plane.state.get_job(run_id, long.id)).state == JobState.DONE


async def test_stop_lets_the_running_job_finish_and_takes_no_more(
    plane_env: PlaneEnv, run_id: str, default_fetch_wait: float
) -> None:
    first = Job(kind=JobKind.STEER, run_id=run_id, params={"do": "sleep", "seconds": 1.5})
    rest = RunPlan(
        run_id=run_id + "r", spec_hash="rest", jobs=jobs_of(run_id + "r", JobKind.PROBE, 2)
    )
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="stop", jobs=[first]))
        async with worker(behave, STEERER_KINDS, concurrency=1) as task:
            deadline = time.monotonic() + 10
            while (await plane.state.get_job(run_id, first.id)).state != JobState.RUNNING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await submit(rest)
            stopping = time.monotonic()
        stopped_s = time.monotonic() - stopping
        assert task.result().done == 1
        assert (await plane.state.get_job(run_id, first.id)).state == JobState.DONE
        assert await plane.queue.depth(JobKind.PROBE) == 2  # left for the next worker
        assert stopped_s < 1.5 + 1.0


async def test_an_idle_worker_stops_without_waiting_out_a_poll(
    plane_env: PlaneEnv, run_id: str, default_fetch_wait: float
) -> None:
    async with open_plane() as plane, worker(behave, STEERER_KINDS, concurrency=1):
        await warm_up(plane, run_id)
        await asyncio.sleep(0.5)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1.0


def test_exported_names() -> None:
    assert set(dispatch.__all__) == {"Dispatcher", "Puller", "Starter"}


async def test_a_late_reply_is_kept_for_the_next_pull(plane_env: PlaneEnv, run_id: str) -> None:
    job = Job(kind=JobKind.NOOP, run_id=run_id, params={"n": 1})
    strays: list[int] = []
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="late", jobs=[job]))
        puller = dispatch.Puller(
            plane.nc, plane.queue.names, JobKind.NOOP, lambda: strays.append(1)
        )
        await puller.open()
        try:
            # A reply nobody waits for any more, as when a pull timed out on a slow server.
            request = json.dumps({"batch": 1, "no_wait": True}).encode()
            await plane.nc.publish(puller.request_subject, request, reply=puller.inbox)
            deadline = time.monotonic() + 5
            while not strays:
                assert time.monotonic() < deadline, "the late reply never arrived"
                await asyncio.sleep(0.02)
            msg = await puller.pull(timeout=1.0)
            assert msg is not None and json.loads(msg.data)["id"] == job.id
            await msg.ack()
            assert await puller.pull(timeout=1.0) is None  # and the queue is empty now
        finally:
            await puller.close()


async def test_a_late_reply_while_busy_is_kept_in_progress_and_runs_next(
    plane_env: PlaneEnv, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QSENS_NATS_ACK_WAIT_S", "1")
    settings_mod.reset()
    started: list[tuple[JobKind, int]] = []

    async def start(kind: JobKind, msg: Msg) -> None:
        started.append((kind, int(msg.metadata.num_delivered or 0)))
        if kind == JobKind.NOOP:
            await asyncio.sleep(3.5)  # longer than ack_wait
        await msg.ack()

    async with open_plane() as plane:
        names = plane.queue.names
        for kind in (JobKind.NOOP, JobKind.STEER):
            await plane.js.publish(names.job_subject(kind), kind.value.encode())
        kinds = (JobKind.NOOP, JobKind.STEER)
        dispatcher = dispatch.Dispatcher(
            plane.nc,
            names,
            kinds,
            concurrency=1,
            settings=settings_mod.get(NatsSettings),
            start=start,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop))
        try:
            deadline = time.monotonic() + 5
            while not started:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert started == [(JobKind.NOOP, 1)]
            # The steer message comes to the worker's inbox while its one slot is busy, as a
            # reply to a request it stopped waiting for.
            steer = dispatcher.pullers[kinds.index(JobKind.STEER)]
            request = json.dumps({"batch": 1, "no_wait": True}).encode()
            await plane.nc.publish(steer.request_subject, request, reply=steer.inbox)
            await asyncio.sleep(1.5)  # past the steer message's ack_wait
            # Another worker asking now gets nothing: the message is still this worker's.
            other = await plane.js.pull_subscribe_bind(
                durable=names.consumer(JobKind.STEER), stream=names.job_stream(JobKind.STEER)
            )
            with pytest.raises(nats.errors.TimeoutError):
                await other.fetch(1, timeout=1.0)
            await other.unsubscribe()
            assert len(started) == 1  # the noop job is still running
            deadline = time.monotonic() + 5
            while len(started) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert started == [(JobKind.NOOP, 1), (JobKind.STEER, 1)]
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=10)
        assert await plane.queue.depth(JobKind.STEER) == 0


@pytest.fixture
def own_nats(
    plane_env: PlaneEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[localstack.NatsServer]:
    """A nats-server of this test's own (the test stops and restarts it)."""
    server = localstack.start_nats(tmp_path)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QSENS_NATS_RECONNECT_WAIT_S", "0.5")
    settings_mod.reset()
    yield server
    server.stop(timeout_s=5)


def restart(server: localstack.NatsServer, log: Path) -> subprocess.Popen[bytes]:
    """The same server again: same port, user and JetStream store."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [server.process.argv[0], "-c", server.config_path], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((server.host, server.port), timeout=0.5).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


async def test_a_worker_serves_again_after_nats_restarts(
    own_nats: localstack.NatsServer, run_id: str, tmp_path: Path
) -> None:
    after = RunPlan(run_id=run_id + "a", spec_hash="after", jobs=jobs_of(run_id + "a", BUSY, 3))
    again: subprocess.Popen[bytes] | None = None
    try:
        async with worker(behave, STEERER_KINDS, concurrency=1) as task:
            async with open_plane() as plane:
                await warm_up(plane, run_id)
            assert own_nats.stop(timeout_s=10) == "stopped"
            await asyncio.sleep(2.0)  # the worker keeps trying to reconnect meanwhile
            assert not task.done()
            again = restart(own_nats, tmp_path / "nats-again.log")
            async with open_plane() as plane:
                await submit(after)
                await wait_status(plane.state, after.run_id, ["succeeded"], timeout_s=30)
        assert task.result().done == 1 + len(after.jobs)
    finally:
        if again is not None:
            again.terminate()
            again.wait(timeout=15)
