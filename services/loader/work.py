"""Admission and cancellation of the loader's model work.

A loader runs one model pass at a time, so every request that needs the model waits its turn
on the model thread. ``WorkQueue`` bounds how many such requests are admitted at once (running
or waiting); past the bound a request is refused with ``Busy`` and a retry-after taken from
the observed service time of recent requests. Each admitted request carries a ``CancelToken``
that is set when its caller goes away or its deadline passes; the engine checks it between
micro-batches and decode steps, so abandoned work stops promptly and work whose caller is
already gone never starts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

from services.common.errors import QsensError, ResourceExhausted

__all__ = [
    "RETRY_AFTER_KEY",
    "WORK_TIMEOUT_KEY",
    "Busy",
    "CancelToken",
    "Ticket",
    "WorkCancelled",
    "WorkQueue",
]

CancelReason = Literal["deadline", "cancelled"]
# Request metadata: the work's own time limit, counted from when it starts on the model thread.
WORK_TIMEOUT_KEY = "qsens-work-timeout-ms"
# Trailing metadata of a RESOURCE_EXHAUSTED answer from a full queue: when to try again.
RETRY_AFTER_KEY = "retry-after-ms"

# Bounds of the advertised retry-after: never a busy loop, never longer than a client would
# reasonably sleep before looking again.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 30.0


class WorkCancelled(QsensError):
    """The caller went away or its deadline passed; the work was stopped or never started."""

    def __init__(self, reason: CancelReason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Busy(ResourceExhausted):
    """The queue of model work is full; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float, pending: int, limit: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the loader is busy ({pending} requests pending, limit {limit}); "
            f"retry after {round(retry_after_s * 1000)} ms"
        )


class CancelToken:
    """Tells the model thread that a request's work is no longer wanted.

    ``deadline`` is the caller's (``time.monotonic()`` clock); ``work_timeout_s`` bounds the
    work itself and starts counting when the work first runs on the model thread, so time
    spent behind other callers' work does not count against it.
    """

    def __init__(
        self, deadline: float | None = None, *, work_timeout_s: float | None = None
    ) -> None:
        self._cancelled = threading.Event()
        self._reason: CancelReason = "cancelled"
        self._deadline = deadline
        self._work_timeout_s = work_timeout_s
        self.started: float | None = None

    def cancel(self, reason: CancelReason = "cancelled") -> None:
        if not self._cancelled.is_set():
            self._reason = reason
            self._cancelled.set()

    def start(self) -> None:
        """Mark the work as started (the first call starts the work timeout)."""
        if self.started is not None:
            return
        self.started = time.monotonic()
        if self._work_timeout_s is not None:
            until = self.started + self._work_timeout_s
            self._deadline = until if self._deadline is None else min(self._deadline, until)

    @property
    def cancelled(self) -> bool:
        if self._cancelled.is_set():
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.cancel("deadline")
            return True
        return False

    def error(self) -> WorkCancelled:
        if self._reason == "deadline":
            return WorkCancelled("deadline", "deadline exceeded; the work was stopped")
        return WorkCancelled("cancelled", "the caller went away; the work was stopped")

    def check(self) -> None:
        """Raise ``WorkCancelled`` if the work is no longer wanted (the engine's checkpoint)."""
        if self.cancelled:
            raise self.error()

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when cancelled (fault injection)."""
        end = time.monotonic() + seconds
        while not self.cancelled:
            left = end - time.monotonic()
            if left <= 0:
                return
            self._cancelled.wait(min(left, 0.05))


@dataclass(eq=False)
class Ticket:
    """One admitted request: its slot in the queue, its token and its model-thread time."""

    rpc: str
    token: CancelToken
    busy_s: float = 0.0


class WorkQueue:
    """At most ``max_pending`` admitted requests; retry-after from observed service time.

    Thread-safe: the gRPC server and the OpenAI endpoint admit from different event loops.
    Service time is a request's time on the model thread (not its wait), averaged with an
    exponential weight so the estimate follows the current workload.
    """

    def __init__(self, max_pending: int, *, initial_service_s: float = 1.0) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending = 0
        self._service_s = initial_service_s
        self._observed = 0

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def service_s(self) -> float:
        """Mean model-thread time of recent requests (the initial guess until one finished)."""
        return self._service_s

    def retry_after_s(self) -> float:
        """When a refused caller should look again: about one request's service time.

        The model thread frees one slot per request it finishes; waiting longer only delays
        the caller, earlier only spends a round trip.
        """
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, self._service_s))

    def admit(self, rpc: str, token: CancelToken) -> Ticket:
        """A slot for one request, or ``Busy`` when ``max_pending`` are admitted already."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise Busy(self.retry_after_s(), self._pending, self.max_pending)
            self._pending += 1
        return Ticket(rpc, token)

    def release(self, ticket: Ticket) -> None:
        """Free the slot; a request that ran to completion updates the service time."""
        with self._lock:
            self._pending -= 1
            if ticket.busy_s > 0 and not ticket.token.cancelled:
                # The first observation replaces the guess; later ones move it by a fifth.
                weight = 1.0 if self._observed == 0 else 0.2
                self._service_s += weight * (ticket.busy_s - self._service_s)
                self._observed += 1
