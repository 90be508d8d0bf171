"""Upstream protection: a token-bucket rate limit, a retry policy and a circuit breaker.

* ``TokenBucket`` spaces requests to ``rate`` per second with bursts of ``burst``.
* ``RetryPolicy`` gives exponential backoff with full jitter, and honours a server's
  ``Retry-After`` (seconds or an HTTP date; ``retry-after-ms`` too): the wait is never shorter
  than what the server asked for, and a request is given up when it asks for longer than
  ``retry_after_max_s``.
* ``CircuitBreaker`` opens after ``failure_threshold`` consecutive failures, refuses calls for
  ``reset_timeout_s``, then lets exactly one probe through (half-open): success closes it,
  failure opens it again. Rate limiting (429) and rejected requests (4xx) are neutral.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "RetryPolicy",
    "TokenBucket",
    "parse_retry_after",
]

Clock = Callable[[], float]


class TokenBucket:
    """An async token bucket; ``acquire()`` waits until a token is available."""

    def __init__(self, rate_per_s: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a token if one is available now."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def acquire(self) -> float:
        """Take one token, waiting in FIFO order; returns the seconds waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        started = self._clock()
        async with self._lock:
            while not self.try_acquire():
                await asyncio.sleep((1.0 - self._tokens) / self.rate)
        return self._clock() - started


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds a server asked to wait, from ``retry-after-ms`` or ``Retry-After``; None if absent.

    ``headers`` must be case-insensitive (httpx headers) or use lower-case keys.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded, honouring Retry-After."""

    max_retries: int = 6
    base_s: float = 0.5
    max_s: float = 30.0
    retry_after_max_s: float = 120.0

    def delay(
        self, retry: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before retry number ``retry`` (0-based), or None to give up."""
        if retry >= self.max_retries:
            return None
        draw = (rng or random).random()
        if retry_after is not None:
            if retry_after > self.retry_after_max_s:
                return None
            # At least what the server asked for; a little jitter so callers do not stampede.
            return retry_after + draw * min(self.base_s, 0.1 * retry_after + 0.01)
        cap = min(self.max_s, self.base_s * (2.0**retry))
        return draw * cap


class BreakerState(StrEnum):
    """Circuit breaker states (the gauge encodes them 0, 1, 2)."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe.

    Callers do ``if breaker.try_acquire(): ... record_success()/record_failure()/record_neutral()``;
    every acquired call must be followed by exactly one ``record_*``.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and reset_timeout_s > 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._lock = threading.Lock()
        self.opened_count = 0

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if state is BreakerState.OPEN:
                self.opened_count += 1
            if self._on_change is not None:
                self._on_change(state)

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker turns half-open once its timeout passes)."""
        with self._lock:
            self._advance()
            return self._state

    def _advance(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout_s
        ):
            self._probe_out = False
            self._set(BreakerState.HALF_OPEN)

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        with self._lock:
            self._advance()
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def try_acquire(self) -> bool:
        """Whether a call may go upstream now."""
        with self._lock:
            self._advance()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probe_out = False
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
            ):
                self._opened_at = self._clock()
                self._probe_out = False
                self._set(BreakerState.OPEN)

    def record_neutral(self) -> None:
        """The call said nothing about upstream health (429, 4xx): release a probe slot."""
        with self._lock:
            self._probe_out = False
