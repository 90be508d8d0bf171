"""Fixtures of the analyzer tests: one planted run in the session's real S3 server, analysed once.

The planted run and its analysis are module-scoped and shared by the tests that only read
them; tests that write (reruns, on-demand reports) use their own run ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from services.analyzer.handler import run_analysis
from services.analyzer.loading import RunArtefacts, load_run
from services.common import localstack
from services.common.settings import S3Settings
from services.common.store import AsyncS3Store, S3Store
from tests.analyzer.planted import Planted, write_planted_run


def store_for(server: localstack.S3Server) -> S3Store:
    """A store on the session's S3 server, without touching the environment."""
    return S3Store(
        S3Settings(
            endpoint=server.endpoint,
            bucket=server.bucket,
            access_key=SecretStr(server.access_key),
            secret_key=SecretStr(server.secret_key),
            secure=False,
        )
    )


@pytest.fixture(scope="session")
def store(s3_server: localstack.S3Server) -> S3Store:
    return store_for(s3_server)


@dataclass
class Analysed:
    """The planted run, what the analyzer loaded from it, and the manifest it wrote."""

    planted: Planted
    run: RunArtefacts
    manifest: dict[str, Any]
    store: S3Store

    def doc(self, name: str) -> Any:
        return self.store.get_json(self.manifest["outputs"][name])


@pytest.fixture(scope="session")
def analysed(store: S3Store) -> Iterator[Analysed]:
    run_id = "planted-" + uuid.uuid4().hex[:10]
    planted = write_planted_run(store, run_id)
    astore = AsyncS3Store(store)
    manifest = asyncio.run(run_analysis(astore, run_id))
    run = asyncio.run(load_run(astore, run_id))
    yield Analysed(planted, run, manifest, store)
