"""The loader's OpenAI-compatible endpoint, driven by the official openai client."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.loader_procs import LoaderProc


def test_chat_completion_with_logprobs(tiny_loader: LoaderProc) -> None:
    client = openai.OpenAI(base_url=tiny_loader.http_base, api_key="not-used", max_retries=0)
    reply = client.chat.completions.create(
        model="tiny-llama@fp32",
        messages=[
            {"role": "system", "content": "Rate it."},
            {"role": "user", "content": "Score: "},
        ],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    choice = reply.choices[0]
    assert reply.model == "tiny-llama@fp32"
    assert choice.finish_reason in ("length", "stop")
    assert choice.logprobs is not None and choice.logprobs.content is not None
    steps = choice.logprobs.content
    assert len(steps) == 3
    for step in steps:
        assert len(step.top_logprobs) == 5
        assert step.top_logprobs[0].token == step.token  # greedy picks the top token
        assert step.logprob == pytest.approx(step.top_logprobs[0].logprob)
        total = sum(math.exp(t.logprob) for t in step.top_logprobs)
        assert 0 < total <= 1.0001
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_n_samples_and_seed(tiny_loader: LoaderProc) -> None:
    client = openai.OpenAI(base_url=tiny_loader.http_base, api_key="x", max_retries=0)
    kwargs = dict(
        model="m",
        messages=[{"role": "user", "content": "Go"}],
        max_tokens=6,
        temperature=1.0,
        n=3,
        seed=5,
    )
    a = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1


def test_errors_name_the_field(tiny_loader: LoaderProc) -> None:
    client = openai.OpenAI(base_url=tiny_loader.http_base, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[], max_tokens=2)
    assert "messages" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert "temperature" in str(info.value)
    bad = httpx.post(f"{tiny_loader.http_base}/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    models = httpx.get(f"{tiny_loader.http_base}/models", timeout=10).json()
    assert models["data"][0]["id"] == "tiny-llama@fp32"
