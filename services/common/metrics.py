"""Prometheus helpers: one registry per process, served on its own port."""

from __future__ import annotations

import os
import resource
import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, start_http_server

__all__ = [
    "LATENCY_BUCKETS",
    "SIZE_BUCKETS",
    "process_memory_bytes",
    "start_metrics_server",
]

# Seconds, from a cached judge hit (ms) to a long generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Batch sizes and counts.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

_lock = threading.Lock()
_started: dict[tuple[str, int], int] = {}


def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> int:
    """Serve ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port."""
    with _lock:
        key = (host, port)
        if port and key in _started:
            return _started[key]
        server: Any
        server, _thread = start_http_server(port, addr=host, registry=registry)
        bound = int(server.server_port)
        _started[(host, bound)] = bound
        return bound


def process_memory_bytes() -> int:
    """Resident set size of this process in bytes (Linux), else peak RSS."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_gauge(name: str, documentation: str) -> Gauge:
    """A gauge that reads this process's RSS at scrape time."""
    gauge = Gauge(name, documentation)
    gauge.set_function(lambda: float(process_memory_bytes()))
    return gauge
