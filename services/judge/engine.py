"""The judging pipeline shared by the NATS service and the client's direct mode.

request -> content addresses -> de-duplication (within the request and against identical items
already in flight) -> cache -> micro-batches to the backend -> cache the stable verdicts ->
one result per item, in request order. A ``fresh`` request (a re-judging) skips the cache and
the sharing and sends every distinct item to the backend; its verdicts are not cached. Only a
malformed request raises; every item-level failure is that item's ``unscorable`` result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from services.common.logging import get_logger
from services.common.settings import JudgeSettings, get
from services.judge.backends.base import JudgeBackend, WorkItem
from services.judge.batcher import MicroBatcher
from services.judge.cache import JudgeCache, NullJudgeCache, cache_key
from services.judge.metrics import judge_metrics
from services.judge.models import JudgeRequest, JudgeResult, JudgeStatus, Reason, Verdict
from services.judge.rubrics import resolve_rubric, rubric_hash, validate_template

__all__ = ["Judge"]

log = get_logger(__name__)


class Judge:
    """Scores requests with one backend, a cache and a micro-batcher."""

    def __init__(
        self,
        backend: JudgeBackend,
        cache: JudgeCache | None = None,
        settings: JudgeSettings | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache or NullJudgeCache()
        self.settings = settings or get(JudgeSettings)
        self._metrics = judge_metrics()
        self._inflight: dict[str, asyncio.Future[Verdict]] = {}
        self._batcher: MicroBatcher[WorkItem, Verdict] = MicroBatcher(
            self.backend.score_batch,
            _batch_failed,
            max_items=self.settings.batch_max_items,
            window_s=self.settings.batch_window_s,
            max_in_flight=self.settings.batches_in_flight,
            on_batch=lambda n: self._metrics.batch_items.labels(self.backend.name).observe(n),
        )
        self._started = False
        self.cache_hits = 0
        self.cache_misses = 0

    async def start(self) -> None:
        """Start the backend (load models, open clients)."""
        if not self._started:
            await self.backend.start()
            self._started = True

    async def close(self) -> None:
        await self._batcher.close()
        await self.backend.close()
        await self.cache.close()

    def _work_items(self, request: JudgeRequest) -> list[WorkItem]:
        hashes: dict[str, str] = {}
        for key, rubric in request.rubrics.items():
            validate_template(rubric.eval_prompt, f"rubrics.{key}.eval_prompt")
        identity = self.backend.identity()
        items = []
        for item in request.items:
            rubric = resolve_rubric(request, item.rubric)
            if item.rubric not in hashes:
                self.backend.check_rubric(rubric, f"rubrics.{item.rubric}.eval_prompt")
                hashes[item.rubric] = rubric_hash(rubric)
            items.append(
                WorkItem(
                    question=item.question,
                    answer=item.answer,
                    rubric_key=item.rubric,
                    rubric=rubric,
                    rubric_hash=hashes[item.rubric],
                    key=cache_key(
                        backend=self.backend.name,
                        model=self.backend.model,
                        identity=identity,
                        rubric_hash=hashes[item.rubric],
                        question=item.question,
                        answer=item.answer,
                    ),
                )
            )
        return items

    async def score(self, request: JudgeRequest) -> list[JudgeResult]:
        """One result per item of ``request``, in order."""
        started = time.perf_counter()
        await self.start()
        work = self._work_items(request)
        distinct: dict[str, WorkItem] = {}
        for w in work:
            distinct.setdefault(w.key, w)

        reused: dict[str, Verdict] = {}
        if request.fresh:
            # A re-judging: every distinct item goes to the backend, and its verdict stays out
            # of the cache (the cached one is what the first judging used).
            own = await self._run(list(distinct.values()), fresh=True)
        else:
            own, reused = await self._cached_or_run(distinct)
        verdicts: dict[str, Verdict] = dict(own)
        for key, verdict in reused.items():
            # Nothing was spent on these in this call.
            verdicts[key] = verdict.model_copy(
                update={"attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}
            )

        results = []
        elapsed = time.perf_counter() - started
        for w in work:
            verdict = verdicts[w.key]
            hit = w.key in reused
            result = JudgeResult(
                **verdict.model_dump(),
                backend=self.backend.name,
                model=self.backend.model,
                rubric=w.rubric_key,
                rubric_hash=w.rubric_hash,
                key=w.key,
                cached=hit,
                latency_s=elapsed,
            )
            results.append(result)
            self._metrics.items.labels(
                self.backend.name, result.status.value, str(hit).lower()
            ).inc()
            self._metrics.item_latency.labels(self.backend.name).observe(elapsed)
        return results

    async def _cached_or_run(
        self, distinct: dict[str, WorkItem]
    ) -> tuple[dict[str, Verdict], dict[str, Verdict]]:
        """(scored here, reused): cached verdicts, identical items in flight, the rest scored."""
        # Claim every key nobody is scoring yet *before* the first await: a concurrent request
        # then either waits for our claim or starts after we released it, by which time the
        # verdict is in the cache. Identical items never go upstream twice.
        loop = asyncio.get_running_loop()
        claimed: dict[str, WorkItem] = {}
        theirs: dict[str, asyncio.Future[Verdict]] = {}
        for key, w in distinct.items():
            if key in self._inflight:
                theirs[key] = self._inflight[key]
            else:
                self._inflight[key] = loop.create_future()
                claimed[key] = w
        try:
            cached = await self.cache.get_many(claimed)
        except BaseException:
            self._release(claimed, {})
            raise
        self._release({k: claimed[k] for k in cached}, cached)
        self.cache_hits += len(cached)
        self.cache_misses += len(claimed) - len(cached)
        if cached:
            self._metrics.cache_hits.labels(self.backend.name).inc(len(cached))
        if len(claimed) > len(cached):
            self._metrics.cache_misses.labels(self.backend.name).inc(len(claimed) - len(cached))

        mine = [w for key, w in claimed.items() if key not in cached]
        own, shared = await asyncio.gather(self._run(mine), self._wait(theirs))
        return own, {**cached, **shared}

    def _release(self, items: dict[str, WorkItem], verdicts: dict[str, Verdict]) -> None:
        """Drop claims, handing their verdicts to waiters (no verdict: the waiters' turn)."""
        for key in items:
            fut = self._inflight.pop(key, None)
            if fut is not None and not fut.done():
                if key in verdicts:
                    fut.set_result(verdicts[key])
                else:
                    fut.cancel()

    async def _run(self, mine: Sequence[WorkItem], *, fresh: bool = False) -> dict[str, Verdict]:
        """Score this request's own misses, cache the stable verdicts, release waiters.

        ``fresh`` (a re-judging): nothing is cached and no claim is released (it made none; an
        identical item a normal request is scoring keeps its own claim)."""
        if not mine:
            return {}
        out: dict[str, Verdict] = {}
        try:
            verdicts = await self._batcher.submit_many(mine)
            out = {w.key: v for w, v in zip(mine, verdicts, strict=True)}
            if not fresh:
                await self.cache.put_many({k: v for k, v in out.items() if v.cacheable})
            return out
        finally:
            if not fresh:
                self._release({w.key: w for w in mine}, out)

    async def _wait(self, theirs: dict[str, asyncio.Future[Verdict]]) -> dict[str, Verdict]:
        """Wait for identical items another request is already scoring."""
        out: dict[str, Verdict] = {}
        for key, fut in theirs.items():
            try:
                out[key] = await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not fut.cancelled() or (task is not None and task.cancelling()):
                    raise
                out[key] = _batch_failed(None, RuntimeError("the request scoring it was cancelled"))
        return out


def _batch_failed(_item: WorkItem | None, exc: BaseException) -> Verdict:
    return Verdict(
        status=JudgeStatus.UNSCORABLE,
        reason=Reason.INTERNAL,
        detail=f"{type(exc).__name__}: {exc}"[:2000],
        retryable=True,
    )
