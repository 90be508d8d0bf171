"""Low-priority loader work (the judge's perplexity) never delays or refuses the study's calls.

The model thread starts every queued normal request before any low one, and low requests have
their own bound. The first tests drive ``ModelThread`` and ``WorkQueue`` directly (real
threads); the others a real loader process (tiny random Llama) over gRPC on loopback. Each
ordering test would fail on a single FIFO: there the low requests queued first run first.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.errors import InvalidArgument
from services.loader.client import Chat, PromptItem, ScoreItem
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.work import (
    Busy,
    CancelToken,
    ModelThread,
    WorkQueue,
    parse_priority,
)
from tests.loader_procs import LoaderProc, start_loader

STORY = Chat.of([("user", "Tell me a long story.")])  # greedy: never ends before 1 024 tokens
TEXT = "The quick brown fox jumps over the lazy dog. " * 4
LOW = (("qsens-priority", "low"),)
# Two normal slots (the long request holding the thread and the one under test) and three low.
MAX_PENDING, MAX_PENDING_LOW = 2, 3


# -- the model thread and the queue, in process -----------------------------------------------


def _occupy(thread: ModelThread) -> tuple[Future[bool], threading.Event]:
    """A job that holds ``thread`` until the returned event is set (running on return)."""
    started, gate = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(10.0)

    holder = thread.submit(hold)
    assert started.wait(10.0)
    return holder, gate


def test_model_thread_runs_normal_work_before_low_and_skips_cancelled() -> None:
    thread = ModelThread("test-model")
    holder, gate = _occupy(thread)  # the model is busy with this one
    ran: list[str] = []

    def job(name: str) -> str:
        ran.append(name)
        return name

    try:
        low_a = thread.submit(job, "low-a", priority="low")
        low_b = thread.submit(job, "low-b", priority="low")
        normal_c = thread.submit(job, "normal-c")
        normal_d = thread.submit(job, "normal-d")
        assert thread.queued("low") == 2 and thread.queued("normal") == 2
        assert low_b.cancel() and normal_d.cancel()  # their callers left while they waited
        gate.set()
        assert holder.result(timeout=10) is True
        assert low_a.result(timeout=10) == "low-a" and normal_c.result(timeout=10) == "normal-c"
    finally:
        thread.shutdown(wait=True)
    # A FIFO would have run low-a first.
    assert ran == ["normal-c", "low-a"]
    assert low_b.cancelled() and normal_d.cancelled()


def test_model_thread_passes_exceptions_and_shuts_down() -> None:
    thread = ModelThread("test-model")
    holder, gate = _occupy(thread)
    failing = thread.submit(int, "not a number")
    queued = thread.submit(int, "7", priority="low")
    thread.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert holder.result(timeout=10) is True
    assert failing.cancelled() and queued.cancelled()  # never ran
    with pytest.raises(RuntimeError, match="shut down"):
        thread.submit(int, "1")
    # A fresh thread: a job's exception reaches its future, the next job still runs.
    thread = ModelThread("test-model")
    try:
        bad = thread.submit(int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            bad.result(timeout=10)
        assert thread.submit(int, "7").result(timeout=10) == 7
    finally:
        thread.shutdown(wait=True)


def test_low_requests_have_their_own_bound() -> None:
    queue = WorkQueue(1, max_pending_low=2, initial_service_s=0.5)
    lows = [queue.admit("Score", CancelToken(), "low") for _ in range(2)]
    with pytest.raises(Busy, match=r"2 low-priority requests pending, limit 2") as refused:
        queue.admit("Score", CancelToken(), "low")
    assert refused.value.retry_after_s == pytest.approx(0.5)
    # A flood of low requests leaves the normal slot free.
    normal = queue.admit("Generate", CancelToken())
    assert queue.pending == 3 and queue.pending_of("normal") == 1
    with pytest.raises(Busy, match=r"1 requests pending, limit 1"):
        queue.admit("Generate", CancelToken())
    # A low slot frees only after the normal requests ahead have run: a longer retry-after.
    with pytest.raises(Busy) as refused_behind_normal:
        queue.admit("Score", CancelToken(), "low")
    assert refused_behind_normal.value.retry_after_s == pytest.approx(1.0)
    queue.release(normal)
    for ticket in lows:
        queue.release(ticket)
    assert queue.pending == 0
    assert queue.admit("Score", CancelToken(), "low").priority == "low"


def test_bad_priority_is_named() -> None:
    assert parse_priority(None) == "normal" and parse_priority("") == "normal"
    assert parse_priority("low") == "low"
    with pytest.raises(InvalidArgument) as failure:
        parse_priority("urgent")
    assert failure.value.field == "metadata.qsens-priority"
    assert "normal, low" in failure.value.message


# -- a real loader ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loader() -> Iterator[LoaderProc]:
    proc = start_loader(
        "tiny:llama",
        "fp32",
        env={
            "QSENS_LOADER_MAX_PENDING": str(MAX_PENDING),
            "QSENS_LOADER_MAX_PENDING_LOW": str(MAX_PENDING_LOW),
        },
        http=False,
    )
    yield proc
    proc.stop()


def _metric(proc: LoaderProc, name: str, **labels: str) -> float:
    """The sum of the loader's samples of ``name`` that carry ``labels``."""
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def _until_pending(proc: LoaderProc, priority: str, count: int) -> None:
    """Wait until ``count`` requests of ``priority`` are admitted (so arrival order is known)."""
    deadline = time.monotonic() + 30
    while _metric(proc, "qsens_loader_pending_requests", priority=priority) != count:
        assert time.monotonic() < deadline, f"{priority} requests never reached {count} pending"
        await asyncio.sleep(0.05)


def _long_generate() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        items=[PromptItem(STORY).to_proto()], params=pb.GenerationParams(max_new_tokens=1024)
    )


def _small_generate() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        items=[PromptItem("hello").to_proto()], params=pb.GenerationParams(max_new_tokens=4)
    )


def _low_score(i: int) -> pb.ScoreRequest:
    """Enough work (a few tenths of a second here) that its place in line shows in timings."""
    items = [ScoreItem(f"{i}.{k} {TEXT}", [TEXT]).to_proto() for k in range(8)]
    return pb.ScoreRequest(items=items, options=pb.RunOptions(max_batch_size=2))


async def _timed(call: Awaitable[Any]) -> float:
    await call
    return time.monotonic()


async def test_normal_request_runs_before_queued_low_ones(loader: LoaderProc) -> None:
    waits_before = {
        p: _metric(loader, "qsens_loader_queue_wait_seconds_count", priority=p)
        for p in ("normal", "low")
    }
    async with grpc.aio.insecure_channel(loader.address) as channel:
        stub = pb_grpc.LoaderServiceStub(channel)
        holding = stub.Generate(_long_generate())  # the model thread is busy with this
        await _until_pending(loader, "normal", 1)
        lows = [
            asyncio.ensure_future(_timed(stub.Score(_low_score(i), timeout=300, metadata=LOW)))
            for i in range(MAX_PENDING_LOW)
        ]
        await _until_pending(loader, "low", MAX_PENDING_LOW)
        normal = asyncio.ensure_future(_timed(stub.Generate(_small_generate(), timeout=300)))
        await _until_pending(loader, "normal", 2)  # queued after every low request
        released = time.monotonic()
        holding.cancel()
        normal_done = await normal
        lows_done = await asyncio.gather(*lows)
    # On a FIFO the normal request would finish last, after every low one.
    assert normal_done < min(lows_done), (normal_done - released, [t - released for t in lows_done])
    for p, count in (("normal", 2), ("low", MAX_PENDING_LOW)):
        waited = _metric(loader, "qsens_loader_queue_wait_seconds_count", priority=p)
        assert waited - waits_before[p] == count, p
    assert _metric(loader, "qsens_loader_pending_requests") == 0


async def test_a_flood_of_low_requests_never_refuses_a_normal_one(loader: LoaderProc) -> None:
    rejected_before = _metric(loader, "qsens_loader_rejected_total", rpc="Score", priority="low")
    async with grpc.aio.insecure_channel(loader.address) as channel:
        stub = pb_grpc.LoaderServiceStub(channel)
        holding = stub.Generate(_long_generate())
        await _until_pending(loader, "normal", 1)
        lows = [
            stub.Score(_low_score(i), timeout=300, metadata=LOW) for i in range(MAX_PENDING_LOW)
        ]
        await _until_pending(loader, "low", MAX_PENDING_LOW)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Score(_low_score(9), timeout=30, metadata=LOW)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "low-priority" in (refused.value.details() or "")
        assert int(dict(refused.value.trailing_metadata())["retry-after-ms"]) >= 50
        # Four requests are admitted, more than max_pending (2): a normal one still is.
        normal = stub.Generate(_small_generate(), timeout=300)
        await _until_pending(loader, "normal", 2)
        holding.cancel()
        reply = await normal
        assert len(reply.generations[0].token_ids) == 4
        for call in lows:
            scored = await call
            assert len(scored.results) == 8
    rejected = _metric(loader, "qsens_loader_rejected_total", rpc="Score", priority="low")
    assert rejected == rejected_before + 1
    assert _metric(loader, "qsens_loader_rejected_total", priority="normal") == 0


async def test_bad_priority_metadata_is_named(loader: LoaderProc) -> None:
    async with grpc.aio.insecure_channel(loader.address) as channel:
        stub = pb_grpc.LoaderServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Generate(
                _small_generate(), timeout=30, metadata=(("qsens-priority", "urgent"),)
            )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith("metadata.qsens-priority:")
