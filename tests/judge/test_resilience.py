"""Token bucket, retry policy with Retry-After, circuit breaker; micro-batching."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import pytest

from services.judge.batcher import MicroBatcher
from services.judge.resilience import (
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    TokenBucket,
    parse_retry_after,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_token_bucket_spaces_requests() -> None:
    bucket = TokenBucket(rate_per_s=50.0, burst=5)
    started = time.monotonic()
    for _ in range(15):
        await bucket.acquire()
    elapsed = time.monotonic() - started
    # 5 from the burst, then 10 at 50/s: at least 0.2 s.
    assert 0.18 <= elapsed < 1.0


def test_token_bucket_refills_with_time() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2.0, burst=2, clock=clock)
    assert bucket.try_acquire() and bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.now += 0.5
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.now += 10
    assert bucket.try_acquire() and bucket.try_acquire() and not bucket.try_acquire()


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30, abs=1.0)


def test_retry_policy_backoff_and_retry_after() -> None:
    policy = RetryPolicy(max_retries=4, base_s=0.5, max_s=3.0, retry_after_max_s=10.0)
    rng = random.Random(0)
    for retry, cap in enumerate([0.5, 1.0, 2.0, 3.0]):
        delays = [policy.delay(retry, None, rng) for _ in range(200)]
        assert all(d is not None and 0 <= d <= cap for d in delays)
        assert max(d for d in delays if d is not None) > cap * 0.8  # full jitter spans the range
    assert policy.delay(4) is None  # out of retries
    honoured = [policy.delay(0, 2.0, rng) for _ in range(100)]
    assert all(d is not None and 2.0 <= d <= 2.0 + 0.5 for d in honoured)
    assert policy.delay(0, 11.0) is None  # asks for longer than we wait


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(3, 5.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.try_acquire()
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_acquire()
    assert breaker.retry_in() == pytest.approx(5.0)
    clock.now += 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire()  # the one probe
    assert not breaker.try_acquire()  # nobody else meanwhile
    breaker.record_failure()  # probe failed: open again, timer restarted
    assert breaker.state is BreakerState.OPEN
    clock.now += 4.9
    assert not breaker.try_acquire()
    clock.now += 0.1
    assert breaker.try_acquire()
    breaker.record_neutral()  # a 429 says nothing: the probe slot is free again
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
    assert breaker.opened_count == 2


async def test_batches_close_by_size() -> None:
    sizes: list[int] = []

    async def process(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [i * 2 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        process, lambda i, e: -1, max_items=4, window_s=0.3, max_in_flight=2
    )
    started = time.monotonic()
    assert await batcher.submit_many(list(range(10))) == [i * 2 for i in range(10)]
    assert sizes == [4, 4, 2]
    # Only the last, partial batch waits out its window.
    assert 0.28 <= time.monotonic() - started < 0.6
    await batcher.close()


async def test_batches_close_by_time_window_and_merge_callers() -> None:
    sizes: list[int] = []

    async def process(items: list[str]) -> list[str]:
        sizes.append(len(items))
        return [s.upper() for s in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(
        process, lambda i, e: "", max_items=100, window_s=0.1, max_in_flight=1
    )

    async def late(item: str) -> str:
        await asyncio.sleep(0.02)
        return await batcher.submit(item)

    out = await asyncio.gather(batcher.submit("a"), late("b"), late("c"))
    assert out == ["A", "B", "C"]
    assert sizes == [3]  # three callers, one batch
    await batcher.close()


async def test_in_flight_batches_are_bounded() -> None:
    running = 0
    peak = 0

    async def process(items: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(
        process, lambda i, e: -1, max_items=1, window_s=0.0, max_in_flight=2
    )
    assert await batcher.submit_many(list(range(8))) == list(range(8))
    assert peak == 2
    await batcher.close()


async def test_failing_batch_gives_per_item_errors() -> None:
    calls = 0

    async def process(items: list[int]) -> list[str]:
        nonlocal calls
        calls += 1
        if 3 in items:
            raise RuntimeError("boom")
        return [f"ok{i}" for i in items]

    batcher: MicroBatcher[int, str] = MicroBatcher(
        process, lambda i, e: f"err{i}:{e}", max_items=2, window_s=0.0, max_in_flight=4
    )
    out = await batcher.submit_many([0, 1, 2, 3, 4, 5])
    assert out == ["ok0", "ok1", "err2:boom", "err3:boom", "ok4", "ok5"]
    await batcher.close()
