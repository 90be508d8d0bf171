"""Loader registry: announce, find, expire, withdraw (real NATS KV with a TTL)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.common.loader_registry import LoaderRegistry, variant_token
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
