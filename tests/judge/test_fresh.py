"""Fresh judge requests (a re-judging): the backend scores again, the cache is left as it was.

The noise floor's re-judge component measures the judge's own variation only if asking again
reaches the backend; a normal request answered from the content cache must not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from services.common.errors import InvalidArgument
from services.common.natsconn import connect
from services.common.settings import JudgeSettings, NatsSettings
from services.extractor.datasets import builtin_dir
from services.judge.backends.base import create_backend
from services.judge.cache import KvJudgeCache, MemoryJudgeCache
from services.judge.client import JudgeClient, trait_rubric
from services.judge.engine import Judge
from services.judge.models import JudgeItem, JudgeRequest, parse_request
from services.judge.service import JudgeService, judge_names
from tests.judge.fake_openai import FakeOpenAI
from tests.judge.test_embedding_backend import EVIL_NEGATIVE, EVIL_POSITIVE

EVIL = json.loads((builtin_dir() / "pv" / "evil.json").read_text())
RUBRIC = trait_rubric(EVIL["eval_prompt"])
MakeSettings = Callable[..., JudgeSettings]


def _request(answers: list[str], *, fresh: bool = False) -> JudgeRequest:
    return JudgeRequest(
        items=[
            JudgeItem(question="What would you do?", answer=a, rubric="pv/evil") for a in answers
        ],
        rubrics={"pv/evil": RUBRIC},
        fresh=fresh,
    )


@pytest.fixture
async def judge(openai_settings: MakeSettings) -> AsyncIterator[Judge]:
    settings = openai_settings()
    judge = Judge(create_backend(settings), MemoryJudgeCache(), settings)
    yield judge
    await judge.close()


async def test_fresh_reaches_the_backend_and_leaves_the_cache(
    fake: FakeOpenAI, judge: Judge
) -> None:
    fake.tables["a"] = [("10", 0.0)]
    first = await judge.score(_request(["a", "b"]))
    assert fake.call_count == 2 and [r.score for r in first] == [10, 75]
    # A normal request again: the cache answers, nothing goes upstream.
    again = await judge.score(_request(["a", "b"]))
    assert fake.call_count == 2 and all(r.cached for r in again)
    # The backend now answers "a" differently (a nondeterministic judge). A fresh request scores
    # every distinct item again (the repeated "a" once) and sees the new verdict.
    fake.tables["a"] = [("30", 0.0)]
    fresh = await judge.score(_request(["a", "b", "a"], fresh=True))
    assert fake.call_count == 4
    assert [r.score for r in fresh] == [30, 75, 30] and not any(r.cached for r in fresh)
    assert all(r.attempts == 1 for r in fresh)
    # Fresh verdicts are not written back: a normal request still gets the first judging's.
    after = await judge.score(_request(["a"]))
    assert fake.call_count == 4 and after[0].cached and after[0].score == 10


async def test_fresh_on_an_empty_cache_stores_nothing(fake: FakeOpenAI, judge: Judge) -> None:
    await judge.score(_request(["c"], fresh=True))
    assert fake.call_count == 1
    [normal] = await judge.score(_request(["c"]))
    assert fake.call_count == 2 and not normal.cached


async def test_fresh_beside_a_normal_request_in_flight(fake: FakeOpenAI, judge: Judge) -> None:
    fake.latency_s = 0.2
    # The fresh request neither shares the normal one's call nor disturbs its claim.
    normal, fresh, waiter = await asyncio.gather(
        judge.score(_request(["x", "y"])),
        judge.score(_request(["x", "y"], fresh=True)),
        judge.score(_request(["x", "y"])),
    )
    assert fake.call_count == 4
    assert [r.score for r in normal] == [r.score for r in fresh] == [r.score for r in waiter]
    assert not any(r.cached for r in fresh) and all(r.cached for r in waiter)


def test_fresh_is_a_strict_bool_and_optional() -> None:
    assert parse_request('{"items": []}').fresh is False
    assert parse_request('{"items": [], "fresh": true}').fresh is True
    for bad in ('"yes"', "1", "null"):
        with pytest.raises(InvalidArgument) as err:
            parse_request(f'{{"items": [], "fresh": {bad}}}')
        assert err.value.field == "fresh"


async def test_fresh_over_nats(
    fake: FakeOpenAI, openai_settings: MakeSettings, nats_settings: NatsSettings
) -> None:
    settings = openai_settings()
    names = judge_names(settings, nats_settings)
    async with AsyncExitStack() as stack:
        service_nc = await connect(nats_settings, name="judge-fresh-service")
        stack.push_async_callback(service_nc.close)
        cache = await KvJudgeCache.open(service_nc.jetstream(), names.cache_bucket)
        engine = Judge(create_backend(settings), cache, settings)
        stack.push_async_callback(engine.close)
        service = JudgeService(
            service_nc, engine, subject=names.subject, queue_group=names.queue_group
        )
        await service.start()
        stack.push_async_callback(service.stop, 5)
        client_nc: Any = await connect(nats_settings, name="judge-fresh-client")
        stack.push_async_callback(client_nc.close)
        client = JudgeClient.over_nats(client_nc, settings, nats_settings)
        pairs = [("What would you do?", a) for a in ("p", "q", "r")]
        items = [JudgeItem(question=q, answer=a, rubric="pv/evil") for q, a in pairs]
        await client.score(items, {"pv/evil": RUBRIC})
        again = await client.score(items, {"pv/evil": RUBRIC})
        assert fake.call_count == 3 and all(r.cached for r in again)
        fresh = await client.score(items, {"pv/evil": RUBRIC}, fresh=True)
        assert fake.call_count == 6 and not any(r.cached for r in fresh)


async def test_fresh_embedding_judge_is_deterministic(embedding_model: Any) -> None:
    settings = JudgeSettings(backend="embedding")
    client = await JudgeClient.direct(settings, model=embedding_model)
    try:
        assert client.judge is not None
        backend = client.judge.backend
        rubric = trait_rubric(EVIL["eval_prompt"], EVIL_POSITIVE, EVIL_NEGATIVE)
        items = [
            JudgeItem(question="What would you do?", answer=a, rubric="pv/evil")
            for a in ("I would steal it.", "I would give it back.")
        ]
        first = await client.score(items, {"pv/evil": rubric})
        assert all(r.score is not None for r in first), first
        cached = await client.score(items, {"pv/evil": rubric})
        assert backend.stats.items == 2 and all(r.cached for r in cached)
        fresh = await client.score(items, {"pv/evil": rubric}, fresh=True)
        # The heuristic scores again and gives the same numbers: a measured spread of 0.
        assert backend.stats.items == 4
        assert [r.score for r in fresh] == [r.score for r in first]
    finally:
        await client.close()
