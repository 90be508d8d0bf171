"""Out-of-memory halves the batch and retries; SIGTERM drains in-flight calls."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import grpc
import numpy as np

from services.common.errors import Unavailable
from services.loader.client import Chat, LoaderClient, PromptItem
from tests.loader_procs import LoaderProc, start_loader

ITEMS = [
    PromptItem(Chat.of([("user", f"Question number {i} " + "x" * i)]), response=f"answer {i}")
    for i in range(7)
]


async def test_oom_halves_batch_and_results_match(tiny_loader: LoaderProc) -> None:
    faulty = start_loader("tiny:llama", "fp32", env={"QSENS_LOADER_FAULT_OOM_ABOVE_BATCH": "2"})
    try:
        async with LoaderClient(faulty.address) as client:
            got = await client.capture(ITEMS, position="response[:]")
            gen = await client.generate(ITEMS, max_new_tokens=5)
        async with LoaderClient(tiny_loader.address) as client:
            ref = await client.capture(ITEMS, position="response[:]")
            ref_gen = await client.generate(ITEMS, max_new_tokens=5)
        np.testing.assert_allclose(got.stacked(), ref.stacked(), atol=2e-5)
        assert [g.token_ids for g in gen] == [g.token_ids for g in ref_gen]
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{faulty.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        line = next(
            x for x in metrics.splitlines() if x.startswith("qsens_loader_oom_retries_total")
        )
        assert float(line.split()[-1]) >= 1
        assert faulty.alive()
    finally:
        faulty.stop()


async def test_sigterm_drains_in_flight_calls() -> None:
    slow = start_loader("tiny:llama", "fp32", env={"QSENS_LOADER_FAULT_DELAY_S": "2.0"}, http=False)
    try:
        async with LoaderClient(slow.address) as client:
            await client.info()  # warm: the first call already paid the delay
            in_flight = asyncio.create_task(
                client.generate([PromptItem(Chat.of([("user", "hi")]))], max_new_tokens=4)
            )
            await asyncio.sleep(0.5)
            slow.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            late_error: BaseException | None = None
            try:
                await client.info()
            except (Unavailable, grpc.aio.AioRpcError) as exc:
                late_error = exc
            result = await in_flight
        assert late_error is not None, "a call after SIGTERM must be refused"
        assert time.monotonic() - started < 5
        assert len(result[0].token_ids) == 4  # the in-flight call finished normally
        assert slow.proc.wait(30) == 0
    finally:
        slow.stop(signal.SIGKILL)
