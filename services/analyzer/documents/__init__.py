"""The analysis documents, one module each: its builder (a pure function of the loaded run) and
its report section.

=============================  ==========================================  ===================
document                       builder                                     module
=============================  ==========================================  ===================
``vector_comparison.json``     :func:`~.vectors.vector_comparison`         ``vectors``
``steering_comparison.json``   :func:`~.steering.steering_comparison`      ``steering``
``logit_diff_comparison.json`` :func:`~.logit_diff.logit_diff_comparison`  ``logit_diff``
``benchmark_comparison.json``  :func:`~.benchmarks.benchmark_comparison`   ``benchmarks``
``robustness_ranking.json``    :func:`~.ranking.robustness_ranking`        ``ranking``
``probe_statistics.json``      :func:`~.safety.probe_statistics`           ``safety``
=============================  ==========================================  ===================

Conventions shared by every builder:

* The *reference* of a model is ``<model>@<spec.reference>``; its vectors come from its native
  extraction. A variant's *primary* vector mode is the one its steering used (``replay`` when
  the run has it, else ``native``); both modes are compared when both exist.
* *Depth* of layer ``l`` is ``l / (num_layers - 1)`` (:mod:`services.analyzer.geometry`); the
  layer window of the mean cosine is the captured layers with depth in ``analysis.layer_range``.
* Bootstraps resample units (questions, items, prompts) with ``steering.bootstrap`` resamples;
  each cell's seed is derived from ``steering.seed``, the spec's fingerprint and the cell's
  identity (never the run id), so results do not depend on the order cells are computed in and
  identical inputs rerun under another run id give identical intervals.
* Steering effect is the delta in the steered direction (``+delta`` for ``+``, ``-delta`` for
  ``-`` and ablation); degradation is ``(effect_ref - effect_variant) / effect_ref`` in %,
  undefined when the reference effect is not positive.
* Every cell names the S3 keys it was computed from (``sources``), and every classified cell
  carries its value, interval and class (:mod:`services.analyzer.classify`).
"""

from __future__ import annotations

from typing import Any

from services.analyzer.documents.benchmarks import benchmark_comparison
from services.analyzer.documents.common import SCHEMA
from services.analyzer.documents.logit_diff import logit_diff_comparison
from services.analyzer.documents.ranking import robustness_ranking
from services.analyzer.documents.safety import probe_statistics
from services.analyzer.documents.steering import steering_comparison
from services.analyzer.documents.vectors import vector_comparison
from services.analyzer.loading import RunArtefacts

__all__ = ["DOCUMENTS", "SCHEMA", "build_all"]

DOCUMENTS = (
    "vector_comparison.json",
    "steering_comparison.json",
    "logit_diff_comparison.json",
    "benchmark_comparison.json",
    "robustness_ranking.json",
    "probe_statistics.json",
)


def build_all(run: RunArtefacts) -> dict[str, dict[str, Any]]:
    """Every analysis document, keyed by file name."""
    vectors = vector_comparison(run)
    steering = steering_comparison(run)
    logit = logit_diff_comparison(run)
    bench = benchmark_comparison(run)
    probes = probe_statistics(run)
    ranking = robustness_ranking(run, vectors, steering, bench)
    return {
        "vector_comparison.json": vectors,
        "steering_comparison.json": steering,
        "logit_diff_comparison.json": logit,
        "benchmark_comparison.json": bench,
        "robustness_ranking.json": ranking,
        "probe_statistics.json": probes,
    }
