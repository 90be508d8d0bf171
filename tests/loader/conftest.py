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
