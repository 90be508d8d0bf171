"""Fixtures of the judge tests: the embedding model, fake endpoints, NATS settings.

The nats-server itself is the session fixture ``nats_server`` of the root conftest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.common.settings import JudgeSettings, NatsSettings
from tests.judge.fake_openai import FakeOpenAI, fake_openai


@pytest.fixture(scope="session")
def embedding_model() -> Any:
    """The bundled MiniLM, loaded once for the session."""
    from services.judge.backends.embedding_backend import load_embedding_model

    return load_embedding_model(None)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    """A fresh fake OpenAI endpoint."""
    with fake_openai() as state:
        yield state


@pytest.fixture
def openai_settings(fake: FakeOpenAI) -> Callable[..., JudgeSettings]:
    """JudgeSettings for the openai backend against ``fake``, with fast retries."""

    def make(**overrides: Any) -> JudgeSettings:
        values: dict[str, Any] = {
            "backend": "openai",
            "base_url": fake.base_url,
            "model": "fake-judge",
            "api_key": "sk-test-not-a-real-key",
            "timeout_s": 2.0,
            "max_retries": 3,
            "retry_base_s": 0.01,
            "retry_max_s": 0.05,
            "rate_per_s": 1000.0,
            "burst": 1000,
            "batch_window_s": 0.005,
            "breaker_failures": 50,
            "breaker_reset_s": 0.5,
        }
        values.update(overrides)
        return JudgeSettings(**values)

    return make


@pytest.fixture
def namespace() -> str:
    """A NATS namespace of its own for each test (subjects and buckets do not collide)."""
    return "j" + os.urandom(4).hex()


@pytest.fixture
def nats_settings(nats_server: Any, namespace: str) -> NatsSettings:
    """NatsSettings for the session's nats-server (root conftest) in this test's namespace."""
    return NatsSettings(
        url=nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        namespace=namespace,
    )


@pytest.fixture(scope="session")
def judge_tiny_loader() -> Iterator[Any]:
    """A real loader process (tiny random Llama, gRPC + OpenAI-compatible HTTP) for the session."""
    from tests.loader_procs import start_loader

    proc = start_loader("tiny:llama", "fp32", http=True, metrics=False)
    yield proc
    proc.stop()
