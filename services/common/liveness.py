"""Liveness of a worker's consumer loop: a heartbeat that the loop's own event loop keeps
fresh, answered at ``/livez`` on the process's metrics port.

``/metrics`` is served from a thread, so it answers even when the event loop that runs the
job consumer (pulls, job heartbeats, handlers) is stuck; a Kubernetes liveness probe on it
never restarts a hung worker. The heartbeat task runs on that event loop: a handler that
blocks it, or a loop that stopped, leaves the heartbeat stale, ``/livez`` answers 503 and the
kubelet restarts the container (its job, no longer kept in progress, is redelivered).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

__all__ = ["DEFAULT_BEAT_S", "DEFAULT_MAX_AGE_S", "Check", "Heartbeat"]

# A check answers (alive, one line for the probe's body).
Check = Callable[[], tuple[bool, str]]

DEFAULT_BEAT_S = 5.0
# Longer than any legitimate pause of the event loop (a garbage collection, a large JSON
# parse), shorter than the job heartbeat interval that a blocked loop would also miss.
DEFAULT_MAX_AGE_S = 60.0


class Heartbeat:
    """The time of the last beat; ``check`` is safe to call from any thread."""

    def __init__(
        self,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None

    def beat(self) -> None:
        with self._lock:
            self._last = self._clock()

    def age(self) -> float | None:
        """Seconds since the last beat; None before the first."""
        with self._lock:
            last = self._last
        return None if last is None else self._clock() - last

    def check(self) -> tuple[bool, str]:
        age = self.age()
        if age is None:
            return False, "consumer loop not started"
        if age > self.max_age_s:
            return False, f"consumer loop stalled: last heartbeat {age:.1f} s ago"
        return True, f"consumer loop alive: last heartbeat {age:.1f} s ago"

    async def run(self, every_s: float = DEFAULT_BEAT_S) -> None:
        """Beat every ``every_s`` seconds on the running event loop until cancelled."""
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        while True:
            self.beat()
            await asyncio.sleep(every_s)
