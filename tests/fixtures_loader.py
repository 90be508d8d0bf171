"""Loader fixtures shared by every test folder: real loader processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.loader_procs import LoaderProc, start_loader


@pytest.fixture(scope="session")
def tiny_loader() -> Iterator[LoaderProc]:
    """A tiny random Llama at fp32 with its OpenAI endpoint and metrics."""
    proc = start_loader("tiny:llama", "fp32")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def smollm2_bf16() -> Iterator[LoaderProc]:
    """SmolLM2-135M-Instruct at bf16 (the GGUF is converted once and cached)."""
    proc = start_loader("smollm2-135m", "bf16", timeout=600)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def smollm2_loader_http(smollm2_bf16: LoaderProc) -> str:
    """Base URL of SmolLM2's OpenAI-compatible endpoint."""
    return smollm2_bf16.http_base
