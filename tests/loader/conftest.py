"""Loader fixtures: real loader processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.loader_procs import LoaderProc, start_loader


@pytest.fixture(scope="session")
def tiny_loader() -> Iterator[LoaderProc]:
    proc = start_loader("tiny:llama", "fp32")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def smollm2_bf16() -> Iterator[LoaderProc]:
    proc = start_loader("smollm2-135m", "bf16", timeout=600)
    yield proc
    proc.stop()
