"""Prometheus helpers: one registry per process, served on its own port."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, make_wsgi_app, start_http_server

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


# A check answers (healthy, one line of text): 200 or 503 on its path.
Check = Callable[[], tuple[bool, str]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes and scrapes every few seconds would flood the log."""


def _with_checks(app: Any, checks: Mapping[str, Check]) -> Any:
    """A WSGI app that answers each check's path itself and passes the rest to ``app``."""

    def routed(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return app(environ, start_response)  # type: ignore[no-any-return]
        try:
            ok, text = check()
        except Exception as err:  # a failing check is an unhealthy answer, not a 500
            ok, text = False, f"check failed: {err!r}"
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode() + b"\n"]

    return routed


def start_metrics_server(
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
    *,
    checks: Mapping[str, Check] | None = None,
) -> int:
    """Serve ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port.

    ``checks`` adds paths (``/livez``) answered 200 or 503 by a function of this process."""
    with _lock:
        key = (host, port)
        if port and key in _started:
            return _started[key]
        server: Any
        if checks:
            app = _with_checks(make_wsgi_app(registry), checks)
            server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
            threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        else:
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
