"""Loader registry: announce, find, expire, withdraw (real NATS KV with a TTL)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.common.loader_registry import LoaderRegistry, LoaderStarting, variant_token
from services.common.natsconn import connection
from tests.conftest import PlaneEnv


def test_variant_token_is_one_safe_key_token() -> None:
    assert variant_token("smollm2-135m@nf4") == "smollm2-135m=40nf4"
    assert variant_token("llama-3.1-8b@GPTQ") == "llama-3=2e1-8b=40gptq"
    with pytest.raises(InvalidArgument):
        variant_token("no-precision")


async def test_announce_find_and_withdraw(plane_env: PlaneEnv) -> None:
    async with connection() as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        with pytest.raises(Unavailable, match="smollm2-135m@nf4"):
            await registry.find("smollm2-135m@nf4")
        first = await registry.announce("smollm2-135m@nf4", "127.0.0.1:50051")
        second = await registry.announce("smollm2-135m@nf4", "127.0.0.1:50052")
        other = await registry.announce("smollm2-135m@bf16", "127.0.0.1:50053")
        seen = {await registry.find("smollm2-135m@nf4") for _ in range(20)}
        assert seen == {"127.0.0.1:50051", "127.0.0.1:50052"}
        assert await registry.find("smollm2-135m@bf16") == "127.0.0.1:50053"
        await first.stop()
        await second.stop()
        with pytest.raises(Unavailable, match="no loader for variant smollm2-135m@nf4"):
            await registry.find("smollm2-135m@nf4")
        await other.stop()


async def test_heartbeat_keeps_an_entry_and_a_dead_loader_expires(plane_env: PlaneEnv) -> None:
    # QSENS_NATS_LOADER_TTL_S=2 in tests: the heartbeat re-puts every 0.67 s.
    async with connection() as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        live = await registry.announce("tiny@fp32", "127.0.0.1:6000")
        dead = await registry.announce("tiny@fp16", "127.0.0.1:6001")
        # Simulate a crashed loader: its heartbeat stops but nobody withdraws the entry.
        dead._task.cancel()
        await asyncio.sleep(2.6)
        assert await registry.find("tiny@fp32") == "127.0.0.1:6000"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                await registry.find("tiny@fp16")
            except Unavailable:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the entry of a dead loader did not expire")
        await live.stop()


async def test_waiting_and_starting_loaders_are_not_ready(plane_env: PlaneEnv) -> None:
    """A loader announced before it serves is listed with its state and detail; ``find``
    raises LoaderStarting (an Unavailable) until an entry is ready."""
    async with connection() as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        waiting = await registry.announce(
            "m@gptq", "", state="waiting", detail="for checkpoint c1, made by the job 'q'"
        )
        with pytest.raises(LoaderStarting, match=r"m@gptq is waiting \(\d+ s\): for checkpoint c1"):
            await registry.find("m@gptq")
        assert issubclass(LoaderStarting, Unavailable)
        (entry,) = await registry.entries("m@gptq")
        assert entry.state == "waiting" and entry.since is not None and entry.address == ""
        await waiting.update("starting", "loading c1")
        with pytest.raises(LoaderStarting, match="is starting"):
            await registry.find("m@gptq")
        await waiting.update("ready", address="127.0.0.1:50061")
        assert await registry.find("m@gptq") == "127.0.0.1:50061"
        states = {(e.variant, e.state) for e in await registry.all_entries()}
        assert ("m@gptq", "ready") in states
        await waiting.stop()
        with pytest.raises(Unavailable, match="no loader for variant m@gptq") as err:
            await registry.find("m@gptq")
        assert not isinstance(err.value, LoaderStarting)


async def test_jobs_wait_for_a_starting_loader_without_spending_attempts(
    plane_env: PlaneEnv, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one 'no loader' retry and two attempts allowed, a job whose loader is announced as
    waiting is retried many times, stays queued, spends nothing, and runs once it is ready."""
    from services.common import settings
    from services.common.dag import submit
    from services.common.jobs import Job, JobKind, RunPlan
    from tests.common.handlers import behave
    from tests.common.plane import open_plane, wait_status, worker

    monkeypatch.setenv("QSENS_NATS_MAX_UNAVAILABLE", "1")
    monkeypatch.setenv("QSENS_NATS_MAX_DELIVER", "2")
    monkeypatch.setenv("QSENS_NATS_UNAVAILABLE_DELAY_S", "0.1")
    settings.reset()
    job = Job(kind=JobKind.NOOP, run_id=run_id, params={"do": "loader", "variant": "w@awq"})
    async with open_plane() as plane:
        registry = await LoaderRegistry.open(plane.js)
        entry = await registry.announce("w@awq", "", state="waiting", detail="for checkpoint c2")
        await submit(RunPlan(run_id=run_id, spec_hash="w", jobs=[job]))
        async with worker(behave):
            deadline = time.monotonic() + 30
            record = await plane.state.get_job(run_id, job.id)
            while record.waiting < 8:
                assert time.monotonic() < deadline, record
                await asyncio.sleep(0.1)
                record = await plane.state.get_job(run_id, job.id)
            assert record.state.value in ("queued", "running")
            assert record.failures == 0 and record.unavailable == 0
            assert (record.error or "").startswith("LoaderStarting: the loader of w@awq is")
            await entry.update("ready", address="127.0.0.1:50062")
            summary = await wait_status(plane.state, run_id, ("succeeded", "failed"))
        done = await plane.state.get_job(run_id, job.id)
        await entry.stop()
    assert summary.status == "succeeded"
    assert done.result == {"address": "127.0.0.1:50062"}
    assert done.waiting >= 8 and done.failures == 0 and done.unavailable == 0
