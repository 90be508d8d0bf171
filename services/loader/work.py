"""Admission, ordering and cancellation of the loader's model work.

A loader runs one model pass at a time, so every request that needs the model waits its turn
on the model thread. ``WorkQueue`` bounds how many such requests are admitted at once (running
or waiting); past the bound a request is refused with ``Busy`` and a retry-after taken from
the observed service time of recent requests. Each admitted request carries a ``CancelToken``
that is set when its caller goes away or its deadline passes; the engine checks it between
micro-batches and decode steps, so abandoned work stops promptly and work whose caller is
already gone never starts.

Requests have a priority (``qsens-priority`` metadata): ``normal`` (the study's own calls) or
``low`` (background work such as the judge's perplexity). ``ModelThread`` always starts the
oldest normal request before any low one, and low requests have their own, smaller bound, so
a flood of low-priority work never refuses a normal request and delays it by at most the low
request already running (a streamed Capture yields the thread between its chunks; on a GPU
between windows of chunks computed together, at most ~16k tokens). Strict
priority may starve low work while normal work keeps coming: its callers wait on back-pressure
and their own deadlines, the study's jobs never wait for them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from services.common.errors import InvalidArgument, QsensError, ResourceExhausted

__all__ = [
    "PRIORITY_KEY",
    "RETRY_AFTER_KEY",
    "WORK_TIMEOUT_KEY",
    "Busy",
    "CancelToken",
    "ModelThread",
    "Priority",
    "Ticket",
    "WorkCancelled",
    "WorkQueue",
    "parse_priority",
]

T = TypeVar("T")
CancelReason = Literal["deadline", "cancelled"]
# Highest first: the model thread starts every queued "normal" request before any "low" one.
Priority = Literal["normal", "low"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
# Request metadata: the work's own time limit, counted from when it starts on the model thread.
WORK_TIMEOUT_KEY = "qsens-work-timeout-ms"
# Request metadata: "normal" (default) or "low".
PRIORITY_KEY = "qsens-priority"
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


def parse_priority(value: str | None) -> Priority:
    """A request's priority from its ``qsens-priority`` metadata (absent or empty: normal)."""
    if not value:
        return "normal"
    for priority in PRIORITIES:
        if value == priority:
            return priority
    raise InvalidArgument(
        f"metadata.{PRIORITY_KEY}", f"expected one of {', '.join(PRIORITIES)}, got {value!r}"
    )


class Busy(ResourceExhausted):
    """The queue of model work is full; retry after ``retry_after_s``."""

    def __init__(
        self, retry_after_s: float, pending: int, limit: int, priority: Priority = "normal"
    ) -> None:
        self.retry_after_s = retry_after_s
        kind = "requests" if priority == "normal" else f"{priority}-priority requests"
        super().__init__(
            f"the loader is busy ({pending} {kind} pending, limit {limit}); "
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
    """One admitted request: its slot in the queue, its token, priority and model-thread time."""

    rpc: str
    token: CancelToken
    priority: Priority = "normal"
    busy_s: float = 0.0
    admitted: float = field(default_factory=time.monotonic)
    # Where the request's cancellation was counted ("queued" or "running"); once per request.
    cancelled_at: str | None = None


class WorkQueue:
    """Admitted requests per priority, each bounded; retry-after from observed service time.

    ``max_pending`` bounds normal requests and ``max_pending_low`` low ones, separately, so
    low-priority callers can never fill the slots of normal ones. Thread-safe: the gRPC server
    and the OpenAI endpoint admit from different event loops. Service time is a request's
    time on the model thread (not its wait), averaged with an exponential weight so the
    estimate follows the current workload.
    """

    def __init__(
        self, max_pending: int, *, max_pending_low: int = 4, initial_service_s: float = 1.0
    ) -> None:
        self.limits: dict[Priority, int] = {"normal": max_pending, "low": max_pending_low}
        self._lock = threading.Lock()
        self._pending: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)
        self._service_s = initial_service_s
        self._observed = 0

    @property
    def max_pending(self) -> int:
        return self.limits["normal"]

    @property
    def pending(self) -> int:
        """Admitted requests of every priority."""
        return sum(self._pending.values())

    def pending_of(self, priority: Priority) -> int:
        return self._pending[priority]

    @property
    def service_s(self) -> float:
        """Mean model-thread time of recent requests (the initial guess until one finished)."""
        return self._service_s

    def retry_after_s(self, priority: Priority = "normal") -> float:
        """When a refused caller should look again: about one request's service time.

        The model thread frees one normal slot per normal request it finishes; waiting longer
        only delays the caller, earlier only spends a round trip. A low slot frees only once
        the normal requests ahead have run too.
        """
        ahead = 0 if priority == "normal" else self._pending["normal"]
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, self._service_s * (1 + ahead)))

    def admit(self, rpc: str, token: CancelToken, priority: Priority = "normal") -> Ticket:
        """A slot for one request, or ``Busy`` when its priority's bound is reached."""
        with self._lock:
            pending, limit = self._pending[priority], self.limits[priority]
            if pending >= limit:
                raise Busy(self.retry_after_s(priority), pending, limit, priority)
            self._pending[priority] += 1
        return Ticket(rpc, token, priority)

    def release(self, ticket: Ticket) -> None:
        """Free the slot; a request that ran to completion updates the service time."""
        with self._lock:
            self._pending[ticket.priority] -= 1
            if ticket.busy_s > 0 and not ticket.token.cancelled:
                # The first observation replaces the guess; later ones move it by a fifth.
                weight = 1.0 if self._observed == 0 else 0.2
                self._service_s += weight * (ticket.busy_s - self._service_s)
                self._observed += 1


@dataclass
class _Job:
    future: concurrent.futures.Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class ModelThread:
    """One thread that runs model work: the oldest normal job first, then the oldest low one.

    A small ``concurrent.futures`` executor with one worker and one FIFO per priority in place
    of ``ThreadPoolExecutor``'s single FIFO. A future cancelled while queued is skipped, never
    run. The thread starts with the first job and is a daemon, so a runtime that is never shut
    down (benchmarks, tests) does not keep the process alive.
    """

    def __init__(self, name: str = "model") -> None:
        self.name = name
        self._ready = threading.Condition()
        self._queues: dict[Priority, collections.deque[_Job]] = {
            p: collections.deque() for p in PRIORITIES
        }
        self._thread: threading.Thread | None = None
        self._shutdown = False

    def submit(
        self, fn: Callable[..., T], /, *args: Any, priority: Priority = "normal"
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` behind jobs of its priority and ahead of lower ones."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._ready:
            if self._shutdown:
                raise RuntimeError("the model thread is shut down")
            self._queues[priority].append(_Job(future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._ready.notify()
        return future

    def queued(self, priority: Priority) -> int:
        """Jobs of ``priority`` waiting (cancelled ones included until they are skipped)."""
        return len(self._queues[priority])

    def shutdown(self, *, wait: bool = True, cancel_futures: bool = False) -> None:
        """Accept no more jobs; optionally cancel queued ones and wait for the running one."""
        with self._ready:
            self._shutdown = True
            if cancel_futures:
                for queue in self._queues.values():
                    while queue:
                        queue.popleft().future.cancel()
            self._ready.notify_all()
        if wait and self._thread is not None:
            self._thread.join()

    def _next(self) -> _Job | None:
        with self._ready:
            while True:
                for priority in PRIORITIES:
                    if self._queues[priority]:
                        return self._queues[priority].popleft()
                if self._shutdown:
                    return None
                self._ready.wait()

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued: its caller is gone
            try:
                result = job.fn(*job.args)
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
