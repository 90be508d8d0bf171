"""The judge over a real nats-server: chunking, queue groups, errors, cache across restarts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.common.natsconn import connect
from services.common.settings import JudgeSettings, NatsSettings
from services.extractor.datasets import builtin_dir
from services.judge.backends.base import create_backend
from services.judge.cache import KvJudgeCache
from services.judge.client import JudgeClient, trait_rubric
from services.judge.engine import Judge
from services.judge.models import JudgeReply, JudgeStatus, Reason
from services.judge.service import JudgeService, judge_names
from tests.judge.fake_openai import FakeOpenAI

# The built-in pv/evil trait (the project's own text in the persona-vectors format).
EVIL = json.loads((builtin_dir() / "pv" / "evil.json").read_text())
RUBRIC = trait_rubric(EVIL["eval_prompt"])
StartService = Callable[..., Awaitable[JudgeService]]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@pytest.fixture
def start_service(stack: AsyncExitStack, nats_settings: NatsSettings) -> StartService:
    """Start a judge service (own connection, backend and KV cache) on the test's namespace."""

    async def start(settings: JudgeSettings, **kwargs: Any) -> JudgeService:
        nc = await connect(nats_settings, name="judge-test-service")
        names = judge_names(settings, nats_settings)
        cache = await KvJudgeCache.open(nc.jetstream(), names.cache_bucket)
        judge = Judge(create_backend(settings), cache, settings)
        service = JudgeService(
            nc, judge, subject=names.subject, queue_group=names.queue_group, **kwargs
        )
        await service.start()

        async def stop() -> None:
            await service.stop(5)
            await judge.close()
            await nc.close()

        stack.push_async_callback(stop)
        service.shutdown = stop  # type: ignore[attr-defined]
        return service

    return start


@pytest.fixture
async def client_nc(stack: AsyncExitStack, nats_settings: NatsSettings) -> Any:
    nc = await connect(nats_settings, name="judge-test-client")
    stack.push_async_callback(nc.close)
    return nc


def _pairs(answers: list[str]) -> list[tuple[str, str]]:
    return [("What would you do?", a) for a in answers]


async def test_round_trip_chunks_and_dedupe(
    fake: FakeOpenAI,
    openai_settings: Callable[..., JudgeSettings],
    start_service: StartService,
    client_nc: Any,
    nats_settings: NatsSettings,
) -> None:
    settings = openai_settings(chunk_items=3)
    service = await start_service(settings)
    fake.tables["a"] = [("10", 0.0)]
    fake.tables["b"] = [("20", 0.0)]
    client = JudgeClient.over_nats(client_nc, settings, nats_settings)
    answers = ["a", "b", "c", "a", "b", "c", "a", "b", "c", "d"]
    results = await client.score_trait(_pairs(answers), RUBRIC, trait="pv/evil")
    assert [r.score for r in results] == [10, 20, 75, 10, 20, 75, 10, 20, 75, 75]
    assert all(r.rubric == "pv/evil" and r.backend == "openai" for r in results)
    assert service.requests_handled == 4  # 10 items in chunks of 3
    assert fake.call_count == 4  # one upstream call per distinct item


async def test_cache_hits_survive_a_restart(
    fake: FakeOpenAI,
    openai_settings: Callable[..., JudgeSettings],
    start_service: StartService,
    client_nc: Any,
    nats_settings: NatsSettings,
) -> None:
    settings = openai_settings(max_retries=0)
    first = await start_service(settings)
    fake.faults["flaky"] = ["500"]
    fake.tables["refuse"] = [("REFUSAL", -0.1), ("0", -2.4)]
    fake.tables["words"] = [("Hello", -0.01)]
    client = JudgeClient.over_nats(client_nc, settings, nats_settings)
    answers = ["kind", "evil", "refuse", "words", "flaky"]
    before = await client.score_trait(_pairs(answers), RUBRIC, trait="pv/evil")
    assert [r.status for r in before] == [
        JudgeStatus.SCORED,
        JudgeStatus.SCORED,
        JudgeStatus.REFUSAL,
        JudgeStatus.UNSCORABLE,
        JudgeStatus.UNSCORABLE,
    ]
    assert before[4].reason is Reason.UPSTREAM_ERROR and before[4].retryable
    assert fake.call_count == 5
    await first.shutdown()  # type: ignore[attr-defined]

    await start_service(settings)  # a new process's worth: connection, backend, cache handle
    after = await client.score_trait(_pairs(answers), RUBRIC, trait="pv/evil")
    assert [r.cached for r in after] == [True, True, True, True, False]
    # Stable verdicts come back unchanged without an upstream call; the transient one is retried.
    assert [
        r.model_dump(
            exclude={"cached", "latency_s", "attempts", "prompt_tokens", "completion_tokens"}
        )
        for r in after[:4]
    ] == [
        r.model_dump(
            exclude={"cached", "latency_s", "attempts", "prompt_tokens", "completion_tokens"}
        )
        for r in before[:4]
    ]
    assert after[4].status is JudgeStatus.SCORED
    assert fake.call_count == 6


async def test_big_replies_are_split(
    fake: FakeOpenAI,
    openai_settings: Callable[..., JudgeSettings],
    start_service: StartService,
    client_nc: Any,
    nats_settings: NatsSettings,
) -> None:
    settings = openai_settings(chunk_items=8)
    # A result is about 470 bytes: 2 fit in 1150, 3 do not, so 6 -> 3+3 -> 1+2+1+2.
    service = await start_service(settings, max_reply_bytes=1150)
    client = JudgeClient.over_nats(client_nc, settings, nats_settings)
    results = await client.score_trait(_pairs([f"s{i}" for i in range(6)]), RUBRIC, trait="t")
    assert [r.status for r in results] == [JudgeStatus.SCORED] * 6
    assert service.requests_handled == 1 + 2 + 4


async def test_queue_group_spreads_requests(
    fake: FakeOpenAI,
    openai_settings: Callable[..., JudgeSettings],
    start_service: StartService,
    client_nc: Any,
    nats_settings: NatsSettings,
) -> None:
    settings = openai_settings(chunk_items=1)
    one = await start_service(settings)
    two = await start_service(settings)
    client = JudgeClient.over_nats(client_nc, settings, nats_settings)
    results = await client.score_coherence(_pairs([f"q{i}" for i in range(24)]))
    assert len(results) == 24 and all(r.ok for r in results)
    assert one.requests_handled + two.requests_handled == 24
    assert one.requests_handled > 0 and two.requests_handled > 0


async def test_errors_and_strict_mode(
    fake: FakeOpenAI,
    openai_settings: Callable[..., JudgeSettings],
    start_service: StartService,
    client_nc: Any,
    nats_settings: NatsSettings,
) -> None:
    settings = openai_settings(max_retries=0, chunk_items=3)
    names = judge_names(settings, nats_settings)
    # Nobody listening: the client retries, then says the judge is unavailable.
    lonely = JudgeClient.over_nats(client_nc, openai_settings(request_attempts=2), nats_settings)
    with pytest.raises(Unavailable, match="no reply"):
        await lonely.score_coherence(_pairs(["x"]))

    await start_service(settings)
    client = JudgeClient.over_nats(client_nc, settings, nats_settings)
    items = [{"question": "q", "answer": str(i), "rubric": "pv/evil"} for i in range(10)]
    items[7]["rubric"] = "pv/unknown"
    with pytest.raises(InvalidArgument) as info:
        await client.score(items, {"pv/evil": RUBRIC})
    assert info.value.field == "items[7].rubric"

    # A malformed request straight to the subject gets a request-level error reply.
    msg = await client_nc.request(names.subject, b'{"items": [{"question": 1}]}', timeout=5)
    reply = JudgeReply.model_validate_json(msg.data)
    assert reply.error is not None and reply.error.code == "invalid_argument"
    assert reply.error.field == "items[0].question"

    fake.faults["down"] = ["500"]
    lenient = await client.score_coherence(_pairs(["up", "down"]))
    assert lenient[1].retryable and lenient[0].ok
    fake.faults["down2"] = ["500"]
    with pytest.raises(Unavailable, match=r"1 of 2 items failed transiently \(items\[1\]"):
        await client.score_coherence(_pairs(["up", "down2"]), strict=True)
