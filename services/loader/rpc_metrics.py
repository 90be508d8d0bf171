"""The loader's Prometheus metrics, registered on first use, and the throughput gauge."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, SIZE_BUCKETS, process_memory_bytes

__all__ = ["metrics", "throughput"]


@dataclass
class _Metrics:
    requests: Counter
    errors: Counter
    latency: Histogram
    items: Histogram
    tokens: Counter
    tokens_per_s: Gauge
    inflight: Gauge
    oom: Counter
    memory: Gauge
    graphs_recorded: Counter
    graph_replays: Counter
    cancelled: Counter
    rejected: Counter
    pending: Gauge
    queue_wait: Histogram


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    """Loader metrics, registered on first use."""
    global _metrics
    if _metrics is None:
        memory = Gauge("qsens_loader_memory_bytes", "Memory in use.", ["kind"])
        memory.labels("rss").set_function(lambda: float(process_memory_bytes()))
        memory.labels("accelerator").set_function(
            lambda: float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0
        )
        _metrics = _Metrics(
            requests=Counter("qsens_loader_requests_total", "RPCs handled.", ["rpc", "code"]),
            errors=Counter("qsens_loader_errors_total", "RPCs that failed.", ["rpc", "code"]),
            latency=Histogram(
                "qsens_loader_request_seconds", "RPC latency.", ["rpc"], buckets=LATENCY_BUCKETS
            ),
            items=Histogram(
                "qsens_loader_batch_items", "Items per request.", ["rpc"], buckets=SIZE_BUCKETS
            ),
            tokens=Counter("qsens_loader_tokens_total", "Tokens run through the model.", ["rpc"]),
            tokens_per_s=Gauge(
                "qsens_loader_tokens_per_second", "Throughput of the last request.", ["rpc"]
            ),
            inflight=Gauge("qsens_loader_inflight_requests", "RPCs in progress."),
            oom=Counter("qsens_loader_oom_retries_total", "Batches halved after out-of-memory."),
            memory=memory,
            graphs_recorded=Counter(
                "qsens_loader_capture_graphs_recorded_total",
                "Capture shape buckets recorded (CUDA graphs on a GPU).",
            ),
            graph_replays=Counter(
                "qsens_loader_capture_graph_replays_total",
                "Capture batches served from a recorded bucket.",
            ),
            cancelled=Counter(
                "qsens_loader_cancelled_total",
                "Units of model work whose caller was gone: stopped while running, or never "
                "started (queued).",
                ["rpc", "stage"],
            ),
            rejected=Counter(
                "qsens_loader_rejected_total",
                "Requests refused because the queue of model work was full.",
                ["rpc", "priority"],
            ),
            pending=Gauge(
                "qsens_loader_pending_requests",
                "Requests admitted to the model thread (running or waiting).",
                ["priority"],
            ),
            queue_wait=Histogram(
                "qsens_loader_queue_wait_seconds",
                "Time from admission until a request's work first runs on the model thread.",
                ["priority"],
                buckets=LATENCY_BUCKETS,
            ),
        )
    return _metrics


def throughput(rpc: str, tokens: int, started: float) -> None:
    """Count ``tokens`` for ``rpc`` and set its tokens-per-second gauge since ``started``."""
    elapsed = max(1e-9, time.perf_counter() - started)
    m = metrics()
    m.tokens.labels(rpc).inc(tokens)
    m.tokens_per_s.labels(rpc).set(tokens / elapsed)
