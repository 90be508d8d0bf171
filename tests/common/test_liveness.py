"""The worker's /livez: answered from the metrics server's thread, 200 while the event loop
beats, 503 while the loop is blocked and again 200 once it runs; /metrics answers throughout
(which is why it cannot serve as a liveness probe)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import urllib.error
import urllib.request

import pytest

from services.common.liveness import Heartbeat
from services.common.localstack import free_ports
from services.common.metrics import start_metrics_server


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_heartbeat_ages_and_refuses_bad_settings() -> None:
    now = [100.0]
    beat = Heartbeat(max_age_s=10, clock=lambda: now[0])
    assert beat.check() == (False, "consumer loop not started")
    beat.beat()
    now[0] += 9.5
    assert beat.check()[0] is True
    now[0] += 1.0
    ok, text = beat.check()
    assert not ok and "stalled" in text and "10.5 s" in text
    with pytest.raises(ValueError, match="max_age_s"):
        Heartbeat(max_age_s=0)


def test_livez_follows_the_event_loop() -> None:
    (port,) = free_ports(1)
    heartbeat = Heartbeat(max_age_s=0.6)
    bound = start_metrics_server(port, "127.0.0.1", checks={"/livez": heartbeat.check})
    assert bound == port
    base = f"http://127.0.0.1:{port}"
    assert _get(base + "/livez")[0] == 503  # no loop yet

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    task = asyncio.run_coroutine_threadsafe(heartbeat.run(every_s=0.1), loop)
    try:
        deadline = time.monotonic() + 5
        while _get(base + "/livez")[0] != 200:
            assert time.monotonic() < deadline, "never alive"
            time.sleep(0.05)
        # A handler that blocks the loop (what the runtime forbids, and what hangs a worker).
        loop.call_soon_threadsafe(time.sleep, 2.0)
        deadline = time.monotonic() + 5
        while True:
            status, body = _get(base + "/livez")
            if status == 503:
                break
            assert time.monotonic() < deadline, "a blocked loop still reads as alive"
            time.sleep(0.05)
        assert "stalled" in body
        # /metrics is served from its own thread: it answers while the loop is stuck.
        status, metrics = _get(base + "/metrics")
        assert status == 200 and "python_info" in metrics
        deadline = time.monotonic() + 5
        while _get(base + "/livez")[0] != 200:
            assert time.monotonic() < deadline, "did not recover once the loop ran again"
            time.sleep(0.05)
    finally:
        task.cancel()
        concurrent.futures.wait([task], timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
