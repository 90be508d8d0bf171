"""``JudgeClient``: how workers (extractor vetting, steerer scoring) ask for judgements.

Two modes, one interface and one result type:

* over NATS (``JudgeClient.over_nats(nc)``): batches are cut into chunks that fit the server's
  max payload and ``chunk_items``; chunks go out concurrently to whichever judge service of the
  queue group answers; a chunk is retried with backoff when no service responds or a reply
  times out (safe: judgements are cached by content), and split when the reply would be too
  large;
* ``fresh=True`` asks for a re-judging: the backend scores every item again (the noise floor's
  measure of the judge's own variation); the cache is neither read nor written;
* direct (``await JudgeClient.direct()``): the same backend, cache and batching code in this
  process, for the CLI and laptops (cache in JetStream KV when a NATS connection is given, else
  in memory).

``score`` returns one ``JudgeResult`` per item, in order. Bad input raises ``InvalidArgument``
with the item's index in the caller's list; an unreachable judge raises ``Unavailable``. With
``strict=True`` a transient per-item failure (breaker open, upstream down) raises
``Unavailable`` too, so a job fails and is redelivered instead of recording holes.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from services.common.errors import InvalidArgument, QsensError, ResourceExhausted, Unavailable
from services.common.logging import get_logger
from services.common.settings import JudgeSettings, NatsSettings, get
from services.judge.cache import JudgeCache, KvJudgeCache, MemoryJudgeCache
from services.judge.engine import Judge
from services.judge.models import (
    COHERENCE,
    REQUEST_LIMIT,
    Exemplars,
    JudgeItem,
    JudgeReply,
    JudgeRequest,
    JudgeResult,
    Rubric,
    invalid_argument,
)
from services.judge.service import judge_names

__all__ = ["JudgeClient", "trait_rubric"]

log = get_logger(__name__)

_ITEM_INDEX = re.compile(r"^items\[(\d+)\]")
# Reply bytes one result may take (a 21-entry log-prob table and provenance), for chunking.
_RESULT_BYTES = 4096
_HEADROOM = 8192
_CHUNKS_IN_FLIGHT = 8

ItemLike = JudgeItem | Mapping[str, Any]


def trait_rubric(
    eval_prompt: str,
    positive: Iterable[str] | None = None,
    negative: Iterable[str] | None = None,
) -> Rubric:
    """A trait rubric from its eval prompt and, for the embedding backend, its exemplars."""
    exemplars = None
    if positive is not None and negative is not None:
        exemplars = Exemplars(positive=tuple(positive), negative=tuple(negative))
    return Rubric(kind="trait", eval_prompt=eval_prompt, exemplars=exemplars)


def _as_item(item: ItemLike, index: int) -> JudgeItem:
    if isinstance(item, JudgeItem):
        return item
    try:
        return JudgeItem.model_validate(item)
    except ValidationError as exc:
        inner = invalid_argument(exc)
        raise InvalidArgument(f"items[{index}].{inner.field}", inner.message) from None


class JudgeClient:
    """Scores items through judge services on NATS, or in process."""

    def __init__(
        self,
        *,
        nc: Any = None,
        judge: Judge | None = None,
        settings: JudgeSettings | None = None,
        nats_settings: NatsSettings | None = None,
        owns_judge: bool = False,
    ) -> None:
        if nc is None and judge is None:
            raise ValueError("JudgeClient needs a NATS connection or an in-process Judge")
        self.settings = settings or get(JudgeSettings)
        self.subject = judge_names(self.settings, nats_settings).subject
        self._nc = nc
        self._judge = judge
        self._owns_judge = owns_judge
        self._rng = random.Random()

    @classmethod
    def over_nats(
        cls,
        nc: Any,
        settings: JudgeSettings | None = None,
        nats_settings: NatsSettings | None = None,
    ) -> JudgeClient:
        """A client of the judge services of the configured subject (or namespace)."""
        return cls(nc=nc, settings=settings, nats_settings=nats_settings)

    @classmethod
    async def direct(
        cls,
        settings: JudgeSettings | None = None,
        *,
        nc: Any = None,
        nats_settings: NatsSettings | None = None,
        cache: JudgeCache | None = None,
        **backend_options: Any,
    ) -> JudgeClient:
        """An in-process judge: same backend code, no service (cache in KV when ``nc`` is given)."""
        from services.judge.backends.base import create_backend

        settings = settings or get(JudgeSettings)
        if cache is None:
            if nc is not None:
                cache = await KvJudgeCache.open(
                    nc.jetstream(),
                    judge_names(settings, nats_settings).cache_bucket,
                    settings.cache_ttl_s,
                )
            else:
                cache = MemoryJudgeCache()
        judge = Judge(create_backend(settings, **backend_options), cache, settings)
        await judge.start()
        return cls(judge=judge, settings=settings, owns_judge=True)

    @property
    def judge(self) -> Judge | None:
        """The in-process judge (direct mode)."""
        return self._judge

    async def close(self) -> None:
        """Close an in-process judge this client created (the NATS connection is the caller's)."""
        if self._judge is not None and self._owns_judge:
            await self._judge.close()

    async def score(
        self,
        items: Sequence[ItemLike],
        rubrics: Mapping[str, Rubric] | None = None,
        *,
        strict: bool = False,
        request_id: str = "",
        fresh: bool = False,
    ) -> list[JudgeResult]:
        """One result per item, in order. Items name a key of ``rubrics`` or ``coherence``.

        ``fresh``: a re-judging; the backend scores every item again, bypassing (and not
        updating) the verdict cache (``JudgeRequest.fresh``)."""
        rubrics = dict(rubrics or {})
        judge_items = [_as_item(item, i) for i, item in enumerate(items)]
        for i, item in enumerate(judge_items):
            if item.rubric != COHERENCE and item.rubric not in rubrics:
                raise InvalidArgument(f"items[{i}].rubric", f"unknown rubric {item.rubric!r}")
        if COHERENCE in rubrics:
            raise InvalidArgument(f"rubrics.{COHERENCE}", "the coherence rubric is built in")
        if not judge_items:
            return []
        chunks = self._chunks(judge_items, rubrics)
        gate = asyncio.Semaphore(_CHUNKS_IN_FLIGHT)

        async def run(start: int, end: int) -> list[JudgeResult]:
            async with gate:
                return await self._score_chunk(
                    judge_items, rubrics, start, end, request_id, fresh=fresh
                )

        parts = await asyncio.gather(*(run(s, e) for s, e in chunks))
        results = [r for part in parts for r in part]
        if strict:
            failed = [(i, r) for i, r in enumerate(results) if r.retryable]
            if failed:
                i, first = failed[0]
                raise Unavailable(
                    f"judge: {len(failed)} of {len(results)} items failed transiently "
                    f"(items[{i}]: {first.reason} {first.detail or ''})".strip()
                )
        return results

    async def score_trait(
        self,
        pairs: Sequence[tuple[str, str]],
        rubric: Rubric,
        *,
        trait: str = "trait",
        strict: bool = False,
        fresh: bool = False,
    ) -> list[JudgeResult]:
        """Trait scores of ``(question, answer)`` pairs under one rubric."""
        items = [JudgeItem(question=q, answer=a, rubric=trait) for q, a in pairs]
        return await self.score(items, {trait: rubric}, strict=strict, fresh=fresh)

    async def score_coherence(
        self, pairs: Sequence[tuple[str, str]], *, strict: bool = False, fresh: bool = False
    ) -> list[JudgeResult]:
        """Coherence scores of ``(question, answer)`` pairs."""
        items = [JudgeItem(question=q, answer=a, rubric=COHERENCE) for q, a in pairs]
        return await self.score(items, strict=strict, fresh=fresh)

    # -- chunking and transport --------------------------------------------------------------

    def _budget(self) -> int:
        if self._nc is None:
            return 1 << 62
        return max(16_384, int(self._nc.max_payload) - _HEADROOM)

    def _chunks(
        self, items: Sequence[JudgeItem], rubrics: Mapping[str, Rubric]
    ) -> list[tuple[int, int]]:
        """``[start, end)`` ranges whose requests and replies fit the payload budget."""
        budget = self._budget()
        max_items = min(self.settings.chunk_items, REQUEST_LIMIT, max(1, budget // _RESULT_BYTES))
        rubric_bytes = {k: len(r.model_dump_json()) + len(k) + 8 for k, r in rubrics.items()}
        chunks: list[tuple[int, int]] = []
        start, size = 0, 256
        used: set[str] = set()
        for i, item in enumerate(items):
            item_bytes = len(item.model_dump_json()) + 2
            extra = rubric_bytes.get(item.rubric, 0) if item.rubric not in used else 0
            alone = 256 + item_bytes + rubric_bytes.get(item.rubric, 0)
            if alone > budget:
                raise InvalidArgument(
                    f"items[{i}]", f"item of {alone} bytes exceeds the NATS payload budget {budget}"
                )
            if i > start and (i - start >= max_items or size + item_bytes + extra > budget):
                chunks.append((start, i))
                start, size, used = i, 256, set()
                extra = rubric_bytes.get(item.rubric, 0)
            size += item_bytes + extra
            used.add(item.rubric)
        chunks.append((start, len(items)))
        return chunks

    def _request(
        self,
        items: Sequence[JudgeItem],
        rubrics: Mapping[str, Rubric],
        start: int,
        end: int,
        request_id: str,
        fresh: bool,
    ) -> JudgeRequest:
        part = list(items[start:end])
        needed = {item.rubric for item in part} - {COHERENCE}
        return JudgeRequest(
            items=part,
            rubrics={k: rubrics[k] for k in sorted(needed)},
            request_id=f"{request_id}[{start}:{end}]" if request_id else "",
            fresh=fresh,
        )

    async def _score_chunk(
        self,
        items: Sequence[JudgeItem],
        rubrics: Mapping[str, Rubric],
        start: int,
        end: int,
        request_id: str,
        *,
        fresh: bool = False,
    ) -> list[JudgeResult]:
        request = self._request(items, rubrics, start, end, request_id, fresh)
        if self._judge is None:
            return await self._over_nats(request, items, rubrics, start, end, request_id)
        try:
            return await self._judge.score(request)
        except InvalidArgument as exc:
            raise _shift(exc, start) from None

    async def _over_nats(
        self,
        request: JudgeRequest,
        items: Sequence[JudgeItem],
        rubrics: Mapping[str, Rubric],
        start: int,
        end: int,
        request_id: str,
    ) -> list[JudgeResult]:
        import nats.errors

        # Sent only when set: a judge service older than the field still reads normal requests.
        data = request.model_dump_json(exclude=None if request.fresh else {"fresh"}).encode()
        attempts = self.settings.request_attempts
        last: str = ""
        for attempt in range(attempts):
            try:
                msg = await self._nc.request(
                    self.subject, data, timeout=self.settings.request_timeout_s
                )
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                last = type(exc).__name__
                if attempt + 1 < attempts:
                    delay = min(10.0, 0.25 * 2**attempt) * (0.5 + self._rng.random())
                    log.warning(
                        "judge request: %s; retrying in %.2fs",
                        last,
                        delay,
                        extra={"items": end - start},
                    )
                    await asyncio.sleep(delay)
                continue
            reply = JudgeReply.model_validate_json(msg.data)
            if reply.error is None:
                if len(reply.results) != end - start:
                    raise QsensError(
                        f"judge replied {len(reply.results)} results for {end - start} items"
                    )
                return reply.results
            error = reply.error
            if error.code == "too_large":
                if end - start == 1:
                    raise ResourceExhausted(f"judge: {error.message}")
                mid = (start + end) // 2
                fresh = request.fresh
                first = await self._score_chunk(items, rubrics, start, mid, request_id, fresh=fresh)
                second = await self._score_chunk(items, rubrics, mid, end, request_id, fresh=fresh)
                return first + second
            if error.code == "invalid_argument":
                raise _shift(InvalidArgument(error.field or "request", error.message), start)
            raise QsensError(f"judge service error: {error.message}")
        raise Unavailable(f"judge: no reply on {self.subject!r} after {attempts} attempts ({last})")


def _shift(exc: InvalidArgument, offset: int) -> InvalidArgument:
    """Re-index a chunk-relative ``items[i]`` field path to the caller's list."""
    match = _ITEM_INDEX.match(exc.field)
    if match is None or offset == 0:
        return exc
    field = f"items[{int(match.group(1)) + offset}]{exc.field[match.end() :]}"
    return InvalidArgument(field, exc.message)
