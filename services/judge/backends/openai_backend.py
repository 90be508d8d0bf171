"""The ``openai`` backend: one chat completion per item against any OpenAI-compatible endpoint.

Each item is one request (temperature 0, one output token, ``logprobs`` with 20
``top_logprobs``, seed 0); the score comes from the first token's table (``aggregate``). The
official async client is used with its own retries off: this module retries 429 (honouring
``Retry-After``), 5xx, timeouts, connection errors and malformed bodies with jittered backoff,
under a token bucket, a concurrency bound and a circuit breaker. Other 4xx are not retried.
The response body is parsed strictly here, not by the client, so a truncated body is an error
rather than a half-filled object. The API key is a ``SecretStr`` and is never logged.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import FailedPrecondition
from services.common.logging import get_logger
from services.common.settings import JudgeSettings
from services.judge.backends.base import JudgeBackend, WorkItem
from services.judge.metrics import judge_metrics
from services.judge.models import JudgeStatus, Reason, Verdict
from services.judge.resilience import (
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    TokenBucket,
    parse_retry_after,
)
from services.judge.rubrics import render_prompt

__all__ = ["OpenAIBackend", "resolve_api_key"]

log = get_logger(__name__)

# Placeholder for endpoints that take no key (a loader, a local vLLM): the client insists on one.
_NO_KEY = "no-key-required"


class _Top(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token: str
    logprob: float


class _Position(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token: str
    logprob: float
    top_logprobs: list[_Top] = Field(default_factory=list)


class _Logprobs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: list[_Position] | None = None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    logprobs: _Logprobs | None = None


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(BaseModel):
    model_config = ConfigDict(extra="ignore")
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


def resolve_api_key(settings: JudgeSettings) -> str:
    """The API key: settings (QSENS_JUDGE_API_KEY, OPENAI_API_KEY), then the secret file; a
    local endpoint (``base_url`` set) needs none."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_key_file is not None:
        try:
            key = settings.api_key_file.read_text().strip()
        except OSError as exc:
            raise FailedPrecondition(
                f"api_key_file: cannot read {settings.api_key_file}: {exc.strerror}"
            ) from None
        if key:
            return key
    if settings.base_url is not None:
        return _NO_KEY
    raise FailedPrecondition(
        "judge: the openai backend needs QSENS_JUDGE_API_KEY, QSENS_JUDGE_API_KEY_FILE or "
        "OPENAI_API_KEY (or QSENS_JUDGE_BASE_URL for a local endpoint)"
    )


class _Attempt:
    """Outcome of one upstream call."""

    __slots__ = ("cause", "detail", "reason", "retry_after", "verdict")

    def __init__(
        self,
        verdict: Verdict | None = None,
        *,
        cause: str = "",
        reason: Reason | None = None,
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.verdict = verdict
        self.cause = cause
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class OpenAIBackend(JudgeBackend):
    """LLM judge over the chat-completions API with first-token log-probs."""

    name = "openai"

    def __init__(
        self,
        settings: JudgeSettings,
        *,
        rng: random.Random | None = None,
        http_client: Any = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._rng = rng or random.Random()
        self._http_client = http_client
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._bucket = TokenBucket(settings.rate_per_s, settings.burst)
        self.policy = RetryPolicy(
            max_retries=settings.max_retries,
            base_s=settings.retry_base_s,
            max_s=settings.retry_max_s,
            retry_after_max_s=settings.retry_after_max_s,
        )
        self._metrics = judge_metrics()
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_reset_s,
            on_change=self._breaker_changed,
        )
        self._metrics.breaker_state.labels(self.name).set(0)

    def _breaker_changed(self, state: BreakerState) -> None:
        self._metrics.breaker_state.labels(self.name).set(state.gauge)
        log.warning(
            "judge circuit breaker %s",
            state.value,
            extra={"backend": self.name, "model": self.model},
        )

    @property
    def model(self) -> str:
        return self.settings.model

    def identity(self) -> dict[str, Any]:
        return {
            "top_logprobs": self.settings.top_logprobs,
            "min_numeric_mass": self.settings.min_numeric_mass,
            "refusal_over_score": self.settings.refusal_over_score,
            "max_answer_chars": self.settings.max_answer_chars,
        }

    async def start(self) -> None:
        if self._client is None:
            kwargs: dict[str, Any] = {
                "api_key": resolve_api_key(self.settings),
                "timeout": self.settings.timeout_s,
                "max_retries": 0,
            }
            if self.settings.base_url is not None:
                kwargs["base_url"] = self.settings.base_url
            if self._http_client is not None:
                kwargs["http_client"] = self._http_client
            self._client = openai.AsyncOpenAI(**kwargs)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def score_batch(self, batch: Sequence[WorkItem]) -> list[Verdict]:
        await self.start()
        self.stats.batches += 1
        self.stats.items += len(batch)
        outcomes = await asyncio.gather(
            *(self._score_item(item) for item in batch), return_exceptions=True
        )
        verdicts: list[Verdict] = []
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Verdict):
                verdicts.append(outcome)
            elif isinstance(outcome, asyncio.CancelledError):
                raise outcome
            else:
                log.error("judge item failed unexpectedly: %r", outcome, extra={"key": item.key})
                verdicts.append(
                    Verdict(
                        status=JudgeStatus.UNSCORABLE,
                        reason=Reason.INTERNAL,
                        detail=f"{type(outcome).__name__}: {outcome}"[:2000],
                        retryable=True,
                    )
                )
        return verdicts

    async def _score_item(self, item: WorkItem) -> Verdict:
        prompt = render_prompt(
            item.rubric.eval_prompt, item.question, item.answer, self.settings.max_answer_chars
        )
        attempts = 0
        retry = 0
        while True:
            if not self.breaker.try_acquire():
                self._metrics.errors.labels(self.name, Reason.BREAKER_OPEN.value).inc()
                return Verdict(
                    status=JudgeStatus.UNSCORABLE,
                    reason=Reason.BREAKER_OPEN,
                    detail=f"circuit breaker open; next probe in {self.breaker.retry_in():.1f}s",
                    retryable=True,
                    attempts=attempts,
                )
            attempts += 1
            outcome = await self._call(prompt)
            if outcome.verdict is not None:
                outcome.verdict.attempts = attempts
                return outcome.verdict
            assert outcome.reason is not None
            delay = self.policy.delay(retry, outcome.retry_after, self._rng)
            if delay is None or outcome.reason is Reason.REJECTED:
                self._metrics.errors.labels(self.name, outcome.reason.value).inc()
                return Verdict(
                    status=JudgeStatus.UNSCORABLE,
                    reason=outcome.reason,
                    detail=outcome.detail[:2000],
                    retryable=outcome.reason is not Reason.REJECTED,
                    attempts=attempts,
                )
            self.stats.retries += 1
            self._metrics.retries.labels(self.name, outcome.cause).inc()
            log.info(
                "judge retry in %.2fs after %s",
                delay,
                outcome.cause,
                extra={"attempt": attempts, "key": item.key},
            )
            await asyncio.sleep(delay)
            retry += 1

    async def _call(self, prompt: str) -> _Attempt:
        assert self._client is not None
        async with self._semaphore:
            await self._bucket.acquire()
            self.stats.upstream_calls += 1
            self._metrics.inflight.labels(self.name).inc()
            started = time.perf_counter()
            try:
                raw = await self._client.chat.completions.with_raw_response.create(
                    model=self.settings.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=self.settings.top_logprobs,
                    seed=0,
                )
                body = raw.content
            except openai.RateLimitError as exc:
                self.breaker.record_neutral()
                return self._failed(
                    "rate_limited",
                    Reason.RATE_LIMITED,
                    f"429: {_short(exc)}",
                    parse_retry_after(exc.response.headers),
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status >= 500 or status in (408, 409):
                    self.breaker.record_failure()
                    return self._failed(
                        "server_error",
                        Reason.UPSTREAM_ERROR,
                        f"{status}: {_short(exc)}",
                        parse_retry_after(exc.response.headers) if status == 503 else None,
                    )
                self.breaker.record_neutral()
                return self._failed("rejected", Reason.REJECTED, f"{status}: {_short(exc)}")
            except openai.APITimeoutError:
                self.breaker.record_failure()
                return self._failed(
                    "timeout", Reason.UPSTREAM_ERROR, f"timed out after {self.settings.timeout_s}s"
                )
            except openai.APIConnectionError as exc:
                self.breaker.record_failure()
                return self._failed(
                    "connection", Reason.UPSTREAM_ERROR, f"connection: {_short(exc)}"
                )
            except ValueError as exc:  # the client's own JSON decoding of a broken body
                self.breaker.record_failure()
                return self._failed("invalid_response", Reason.INVALID_RESPONSE, _short(exc))
            finally:
                self._metrics.inflight.labels(self.name).dec()
                self._metrics.upstream_latency.labels(self.name).observe(
                    time.perf_counter() - started
                )
        try:
            completion = _Completion.model_validate_json(body)
        except ValidationError as exc:
            self.breaker.record_failure()
            return self._failed(
                "invalid_response",
                Reason.INVALID_RESPONSE,
                f"malformed completion body ({len(body)} bytes): {exc.errors()[0]['msg']}",
            )
        self.breaker.record_success()
        self.stats.count("ok")
        self._metrics.requests.labels(self.name, "ok").inc()
        return _Attempt(self._verdict(completion))

    def _failed(
        self, cause: str, reason: Reason, detail: str, retry_after: float | None = None
    ) -> _Attempt:
        self.stats.count(cause)
        self._metrics.requests.labels(self.name, cause).inc()
        return _Attempt(cause=cause, reason=reason, detail=detail, retry_after=retry_after)

    def _verdict(self, completion: _Completion) -> Verdict:
        usage = completion.usage or _Usage()
        self._account(usage)
        logprobs = completion.choices[0].logprobs
        positions = logprobs.content if logprobs is not None else None
        if not positions:
            return Verdict(
                status=JudgeStatus.UNSCORABLE,
                reason=Reason.NO_LOGPROBS,
                detail="the endpoint returned no logprobs for the first token",
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
            )
        first = positions[0]
        table = [(t.token, t.logprob) for t in first.top_logprobs]
        if first.token not in {token for token, _ in table}:
            table.append((first.token, first.logprob))
        return self.table_verdict(
            table,
            self.settings,
            table,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )

    def _account(self, usage: _Usage) -> None:
        s = self.settings
        cost = (
            usage.prompt_tokens * s.price_input_per_mtok
            + usage.completion_tokens * s.price_output_per_mtok
        ) / 1e6
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        self.stats.cost_usd += cost
        m = self._metrics
        m.tokens.labels(self.name, s.model, "prompt").inc(usage.prompt_tokens)
        m.tokens.labels(self.name, s.model, "completion").inc(usage.completion_tokens)
        m.cost_usd.labels(self.name, s.model).inc(cost)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
