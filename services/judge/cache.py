"""The judge's content-addressed verdict cache: JetStream KV (``qsens-judge-cache``) or memory.

A key is the hash of everything that decides a verdict (``cache_key``): scoring version,
backend, judge model, the backend's scoring settings, rubric hash, question and answer. Only
stable verdicts are stored (scored, refused, or "the judge did not answer with a number"), so
a transient failure is retried next time while a repeated item is never sent upstream again,
across runs and restarts. A cache fault is a miss, never a failed judgement.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from services.common.hashing import stable_hash
from services.common.logging import get_logger
from services.judge.models import Verdict

__all__ = [
    "CACHE_FORMAT",
    "JudgeCache",
    "KvJudgeCache",
    "MemoryJudgeCache",
    "NullJudgeCache",
    "cache_key",
]

log = get_logger(__name__)

#: Bumped when verdict semantics change, so old entries are never read as new ones.
CACHE_FORMAT = 1
_MAX_CONCURRENT_LOOKUPS = 64


def cache_key(
    *,
    backend: str,
    model: str,
    identity: Mapping[str, Any],
    rubric_hash: str,
    question: str,
    answer: str,
) -> str:
    """The content address of one judgement (40 hex characters, valid as a KV key)."""
    return stable_hash(
        {
            "format": CACHE_FORMAT,
            "backend": backend,
            "model": model,
            "identity": dict(identity),
            "rubric": rubric_hash,
            "question": question,
            "answer": answer,
        },
        length=40,
    )


class JudgeCache(ABC):
    """Verdicts by content address."""

    @abstractmethod
    async def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        """The cached verdicts among ``keys`` (missing keys are absent)."""

    @abstractmethod
    async def put_many(self, entries: Mapping[str, Verdict]) -> None:
        """Store verdicts (callers pass only cacheable ones)."""

    async def close(self) -> None:
        return None


class NullJudgeCache(JudgeCache):
    """Caches nothing."""

    async def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        return {}

    async def put_many(self, entries: Mapping[str, Verdict]) -> None:
        return None


class MemoryJudgeCache(JudgeCache):
    """This process only (direct mode without NATS); bounded, oldest entries dropped first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._data: dict[str, str] = {}

    async def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        return {k: Verdict.model_validate_json(self._data[k]) for k in keys if k in self._data}

    async def put_many(self, entries: Mapping[str, Verdict]) -> None:
        for key, verdict in entries.items():
            self._data[key] = verdict.model_dump_json()
        while len(self._data) > self.max_entries:
            self._data.pop(next(iter(self._data)))


class KvJudgeCache(JudgeCache):
    """Verdicts in a JetStream KV bucket, one key per judgement."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv
        self._limit = asyncio.Semaphore(_MAX_CONCURRENT_LOOKUPS)

    @classmethod
    async def open(
        cls, js: Any, bucket: str = "qsens-judge-cache", ttl_s: float = 0.0, replicas: int = 1
    ) -> KvJudgeCache:
        """Bind to ``bucket`` on a JetStream context, creating it (history 1) if missing."""
        from services.common.natsconn import ensure_kv

        kv = await ensure_kv(
            js,
            bucket,
            ttl_s=ttl_s or None,
            history=1,
            replicas=replicas,
            description="qsens judge verdicts by content address",
        )
        return cls(kv)

    async def _get(self, key: str) -> Verdict | None:
        from nats.js.errors import KeyNotFoundError

        async with self._limit:
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                return None
            except Exception as exc:
                log.warning("judge cache read failed: %r", exc, extra={"key": key})
                return None
        if entry.value is None:
            return None
        try:
            return Verdict.model_validate_json(entry.value)
        except ValidationError:
            log.warning("judge cache entry unreadable; ignored", extra={"key": key})
            return None

    async def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        wanted = list(dict.fromkeys(keys))
        found = await asyncio.gather(*(self._get(k) for k in wanted))
        return {k: v for k, v in zip(wanted, found, strict=True) if v is not None}

    async def _put(self, key: str, verdict: Verdict) -> None:
        async with self._limit:
            try:
                await self._kv.put(key, verdict.model_dump_json().encode())
            except Exception as exc:
                log.warning("judge cache write failed: %r", exc, extra={"key": key})

    async def put_many(self, entries: Mapping[str, Verdict]) -> None:
        await asyncio.gather(*(self._put(k, v) for k, v in entries.items()))
