"""Prometheus metrics of the judge, created on first use (never at import time).

=========================================  =============================================
metric                                      meaning
=========================================  =============================================
qsens_judge_requests_total                  upstream calls by backend and outcome
qsens_judge_items_total                     judged items by backend and status
qsens_judge_batch_items                     micro-batch sizes
qsens_judge_upstream_latency_seconds        one upstream call
qsens_judge_item_latency_seconds            request to verdict, cache hits included
qsens_judge_tokens_total                    prompt / completion tokens
qsens_judge_cost_usd_total                  estimated spend from token prices
qsens_judge_cache_hits_total / _misses      content-addressed cache lookups
qsens_judge_retries_total                   retries by cause
qsens_judge_errors_total                    unscorable items by reason, cache faults
qsens_judge_breaker_state                   0 closed, 1 half-open, 2 open
qsens_judge_refusal_over_score_total        judgments the refusal-over-score setting decided
qsens_judge_inflight                        upstream calls in flight
=========================================  =============================================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, SIZE_BUCKETS

__all__ = ["JudgeMetrics", "judge_metrics"]


@dataclass(frozen=True)
class JudgeMetrics:
    """The judge's metric families (one set per process)."""

    requests: Counter
    items: Counter
    batch_items: Histogram
    upstream_latency: Histogram
    item_latency: Histogram
    tokens: Counter
    cost_usd: Counter
    cache_hits: Counter
    cache_misses: Counter
    retries: Counter
    errors: Counter
    breaker_state: Gauge
    inflight: Gauge
    refusal_over_score: Counter


_lock = threading.Lock()
_metrics: JudgeMetrics | None = None


def judge_metrics() -> JudgeMetrics:
    """The process-wide judge metrics, registered in the default registry on first call."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = JudgeMetrics(
                requests=Counter(
                    "qsens_judge_requests_total",
                    "Upstream judge calls.",
                    ["backend", "outcome"],
                ),
                items=Counter(
                    "qsens_judge_items_total", "Judged items.", ["backend", "status", "cached"]
                ),
                batch_items=Histogram(
                    "qsens_judge_batch_items",
                    "Items per micro-batch sent to a backend.",
                    ["backend"],
                    buckets=SIZE_BUCKETS,
                ),
                upstream_latency=Histogram(
                    "qsens_judge_upstream_latency_seconds",
                    "Latency of one upstream call.",
                    ["backend"],
                    buckets=LATENCY_BUCKETS,
                ),
                item_latency=Histogram(
                    "qsens_judge_item_latency_seconds",
                    "Latency from request to verdict per item.",
                    ["backend"],
                    buckets=LATENCY_BUCKETS,
                ),
                tokens=Counter(
                    "qsens_judge_tokens_total", "Judge tokens.", ["backend", "model", "kind"]
                ),
                cost_usd=Counter(
                    "qsens_judge_cost_usd_total",
                    "Estimated judge spend in USD.",
                    ["backend", "model"],
                ),
                cache_hits=Counter("qsens_judge_cache_hits_total", "Cache hits.", ["backend"]),
                cache_misses=Counter(
                    "qsens_judge_cache_misses_total", "Cache misses.", ["backend"]
                ),
                retries=Counter(
                    "qsens_judge_retries_total", "Upstream retries.", ["backend", "cause"]
                ),
                errors=Counter("qsens_judge_errors_total", "Judge errors.", ["backend", "reason"]),
                breaker_state=Gauge(
                    "qsens_judge_breaker_state",
                    "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                    ["backend"],
                ),
                inflight=Gauge("qsens_judge_inflight", "Upstream calls in flight.", ["backend"]),
                refusal_over_score=Counter(
                    "qsens_judge_refusal_over_score_total",
                    "Judgments where REFUSAL mass exceeded a scorable numeric mass, by the "
                    "status the refusal_over_score setting chose.",
                    ["backend", "status"],
                ),
            )
        return _metrics
