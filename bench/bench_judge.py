"""Judge throughput and de-duplication against a local OpenAI-compatible endpoint.

Prints JSON: judgments/s at upstream concurrency 1 and 64 against an endpoint that takes
100 ms per call (target: a ratio of at least 20), and the number of upstream calls for a batch
with repeated items (target: one per distinct item). The endpoint is the tests' local fake
(real HTTP, OpenAI JSON) run in its own process, so it does not compete with the judge for
the interpreter; the judge is the real pipeline (batcher, backend, resilience).

    .venv/bin/python bench/bench_judge.py [--latency-ms 100] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.settings import JudgeSettings
from services.judge.backends.base import create_backend
from services.judge.cache import MemoryJudgeCache, NullJudgeCache
from services.judge.engine import Judge
from services.judge.models import JudgeItem, JudgeRequest, JudgeStatus
from tests.judge.fake_openai import FakeOpenAI, fake_openai

RUBRIC_KEY = "bench"


def _settings(base_url: str, concurrency: int) -> JudgeSettings:
    return JudgeSettings(
        backend="openai",
        base_url=base_url,
        model="bench-judge",
        api_key="sk-bench",
        concurrency=concurrency,
        rate_per_s=100_000.0,
        burst=100_000,
        batch_max_items=64,
        batch_window_s=0.005,
        batches_in_flight=8,
        timeout_s=30.0,
    )


def _request(answers: list[str]) -> JudgeRequest:
    from services.judge.client import trait_rubric

    rubric = trait_rubric("Rate the answer.\n{question}\n{answer}\nReply with 0-100.")
    return JudgeRequest(
        items=[JudgeItem(question="q", answer=a, rubric=RUBRIC_KEY) for a in answers],
        rubrics={RUBRIC_KEY: rubric},
    )


def _serve(latency_s: float, ports: Any, stop: Any) -> None:
    with fake_openai() as fake:
        fake.latency_s = latency_s
        ports.put(fake.port)
        stop.wait()


async def _throughput(
    base_url: str, latency_s: float, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Judgments/s over distinct items (no cache) for about ``seconds``."""
    settings = _settings(base_url, concurrency)
    judge = Judge(create_backend(settings), NullJudgeCache(), settings)
    await judge.start()
    # Enough items to keep every slot busy for the whole measurement.
    count = max(concurrency * 2, int(seconds * concurrency / max(latency_s, 1e-3)))
    answers = [f"c{concurrency}-item-{i}" for i in range(count)]
    started = time.perf_counter()
    results = await judge.score(_request(answers))
    elapsed = time.perf_counter() - started
    calls = judge.backend.stats.upstream_calls
    await judge.close()
    assert all(r.status is JudgeStatus.SCORED for r in results)
    return {
        "concurrency": concurrency,
        "items": count,
        "seconds": round(elapsed, 3),
        "judgments_per_s": round(count / elapsed, 2),
        "upstream_calls": calls,
    }


async def _dedupe(fake: FakeOpenAI) -> dict[str, Any]:
    """Upstream calls for a batch of 256 items with 16 distinct ones."""
    settings = _settings(fake.base_url, 64)
    judge = Judge(create_backend(settings), MemoryJudgeCache(), settings)
    distinct = [f"dup-{i}" for i in range(16)]
    answers = [distinct[i % len(distinct)] for i in range(256)]
    before = fake.call_count
    results = await judge.score(_request(answers))
    first_pass = fake.call_count - before
    again = await judge.score(_request(answers))  # every item now comes from the cache
    second_pass = fake.call_count - before - first_pass
    await judge.close()
    return {
        "items": len(answers),
        "distinct_items": len(distinct),
        "upstream_calls": first_pass,
        "upstream_calls_repeat_batch": second_pass,
        "cached_on_repeat": sum(r.cached for r in again),
        "scored": sum(r.status is JudgeStatus.SCORED for r in results),
    }


async def main(latency_ms: float, seconds: float) -> dict[str, Any]:
    latency_s = latency_ms / 1000.0
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=_serve, args=(latency_s, ports, stop), daemon=True)
    server.start()
    try:
        base_url = f"http://127.0.0.1:{ports.get(timeout=60)}/v1"
        single = await _throughput(base_url, latency_s, 1, seconds)
        wide = await _throughput(base_url, latency_s, 64, seconds)
    finally:
        stop.set()
        server.join(10)
    with fake_openai() as fake:
        dedupe = await _dedupe(fake)
    ratio = wide["judgments_per_s"] / single["judgments_per_s"]
    return {
        "benchmark": "judge",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "endpoint_latency_ms": latency_ms,
        "concurrency_1": single,
        "concurrency_64": wide,
        "speedup": round(ratio, 2),
        "speedup_target": 20,
        "speedup_ok": ratio >= 20,
        "dedupe": dedupe,
        "dedupe_ok": dedupe["upstream_calls"] == dedupe["distinct_items"]
        and dedupe["upstream_calls_repeat_batch"] == 0,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.latency_ms, args.seconds)), indent=2))
