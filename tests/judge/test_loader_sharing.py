"""The embedding judge shares a busy loader politely: it waits instead of failing, and the
study's own calls go first.

A real loader process (tiny random Llama, gRPC on loopback) with one normal and one low slot;
the study's stand-in is a long Generate holding the model thread. The judge's perplexity
calls (``Score``, ``qsens-priority: low``) are refused as busy, wait on back-pressure, queue
behind the study's work for longer than their own work timeout, and still score.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.common.settings import JudgeSettings
from services.judge.client import JudgeClient
from services.judge.models import JudgeStatus
from services.loader.client import Chat, PromptItem
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from tests.loader_procs import LoaderProc, start_loader

pytestmark = pytest.mark.slow

STORY = Chat.of([("user", "Tell me a long story.")])  # greedy: never ends before 1 024 tokens
# Eight answers in batches of two: four Score calls in flight against one low slot.
PAIRS = [
    (f"Question {i}: what should I do with a lost wallet?", f"Return it to its owner, {i}.")
    for i in range(8)
]
# The judge's work timeout; the study's request holds the loader for longer than this.
WORK_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def busy_loader() -> Iterator[LoaderProc]:
    proc = start_loader(
        "tiny:llama",
        "fp32",
        env={"QSENS_LOADER_MAX_PENDING": "1", "QSENS_LOADER_MAX_PENDING_LOW": "1"},
        http=False,
    )
    yield proc
    proc.stop()


def _metric(proc: LoaderProc, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _client_retries() -> float:
    value = REGISTRY.get_sample_value(
        "qsens_loader_client_backpressure_retries_total", {"rpc": "Score"}
    )
    return value or 0.0


async def test_busy_loader_never_fails_a_judgment(
    busy_loader: LoaderProc, embedding_model: Any
) -> None:
    settings = JudgeSettings(
        backend="embedding",
        loader_address=busy_loader.address,
        loader_timeout_s=WORK_TIMEOUT_S,
        batch_max_items=2,
        batch_window_s=0.0,
        batches_in_flight=4,
    )
    low_waits_before = _metric(busy_loader, "qsens_loader_queue_wait_seconds_count", priority="low")
    normal_waits_before = _metric(
        busy_loader, "qsens_loader_queue_wait_seconds_count", priority="normal"
    )
    retries_before = _client_retries()
    client = await JudgeClient.direct(settings, model=embedding_model)
    try:
        async with grpc.aio.insecure_channel(busy_loader.address) as channel:
            stub = pb_grpc.LoaderServiceStub(channel)
            study = stub.Generate(
                pb.GenerateRequest(
                    # 256 x 1 024 tokens: far longer than the 5 s of waits below even on the
                    # fast generation path of a fast CPU (64 rows took 5.3 s on a 2-core EPYC);
                    # it is cancelled once the judge has been seen waiting.
                    items=[PromptItem(STORY).to_proto() for _ in range(256)],
                    params=pb.GenerationParams(max_new_tokens=1024),
                )
            )
            await asyncio.sleep(0.5)  # the study's request holds the model thread
            judging = asyncio.ensure_future(client.score_coherence(PAIRS))
            # Longer than the judge's work timeout: only time queued, which must not count.
            await asyncio.sleep(WORK_TIMEOUT_S + 1.5)
            assert not judging.done(), "the judge did not wait for the busy loader"
            assert not study.done(), "the study's request must still hold the loader"
            released = time.monotonic()
            study.cancel()
            results = await asyncio.wait_for(judging, timeout=120)
            judged_s = time.monotonic() - released
        assert client.judge is not None
        stats = client.judge.backend.stats
    finally:
        await client.close()
    for result in results:
        assert result.status is JudgeStatus.SCORED, (result.reason, result.detail)
        assert "perplexity" in result.signals and result.signals["nll"] > 0
    # Refused while the one low slot was taken, retried after the loader's retry-after.
    assert _client_retries() > retries_before
    assert _metric(busy_loader, "qsens_loader_rejected_total", rpc="Score", priority="low") >= 1
    # Every Score the judge sent ran at low priority; the study's one request at normal.
    assert stats.retries >= 1
    ran = stats.upstream_calls - stats.retries  # each refused attempt was followed by another
    assert ran == len(PAIRS) // settings.batch_max_items
    low_runs = _metric(busy_loader, "qsens_loader_queue_wait_seconds_count", priority="low")
    assert low_runs - low_waits_before == ran
    normal_runs = _metric(busy_loader, "qsens_loader_queue_wait_seconds_count", priority="normal")
    assert normal_runs - normal_waits_before == 1
    assert judged_s < 60, f"the judgments took {judged_s:.1f}s after the loader was free"
