"""``kv_values``: a snapshot of a KV bucket's current values (real NATS JetStream)."""

from __future__ import annotations

import uuid

from services.common.natsconn import connection, ensure_kv, kv_values
from tests.conftest import PlaneEnv


async def test_a_snapshot_sees_every_value_written_before_it(plane_env: PlaneEnv) -> None:
    # Read right after each write: a snapshot must never miss a value already stored
    # (nats-py's watch-based listing came back empty when its initial values were in flight).
    async with connection() as nc:
        kv = await ensure_kv(nc.jetstream(), f"{plane_env.namespace}-snap", ttl_s=60)
        for i in range(60):
            await kv.put(f"run.{i:03d}", f"v{i}".encode())
            assert await kv_values(kv, "run.*") == [f"v{j}".encode() for j in range(i + 1)]


async def test_a_snapshot_filters_by_pattern_skips_deletes_and_keeps_write_order(
    plane_env: PlaneEnv,
) -> None:
    async with connection() as nc:
        kv = await ensure_kv(nc.jetstream(), f"{plane_env.namespace}-{uuid.uuid4().hex[:6]}")
        assert await kv_values(kv, "a.*") == []
        await kv.put("a.2", b"first")
        await kv.put("b.1", b"other prefix")
        await kv.put("a.1", b"second")
        await kv.put("a.3", b"deleted")
        await kv.delete("a.3")
        await kv.put("a.2", b"updated")  # the latest value, and now the latest write
        assert await kv_values(kv, "a.*") == [b"second", b"updated"]
        assert await kv_values(kv, "b.*") == [b"other prefix"]
        assert await kv_values(kv, ">") == [b"other prefix", b"second", b"updated"]
        await kv.purge("a.1")
        assert await kv_values(kv, "a.*") == [b"updated"]
