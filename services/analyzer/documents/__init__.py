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

from dataclasses import dataclass

from services.analyzer.documents.benchmarks import benchmark_comparison
from services.analyzer.documents.both_directions import logit_diff_both, replay_2x2, steering_both
from services.analyzer.documents.logit_diff import logit_diff_comparison
from services.analyzer.documents.models import (
    SCHEMA,
    AnalysisDocument,
    BenchmarkComparison,
    LogitDiffComparison,
    ProbeStatistics,
    RobustnessRanking,
    SteeringComparison,
    VectorComparison,
)
from services.analyzer.documents.ranking import robustness_ranking
from services.analyzer.documents.safety import probe_statistics
from services.analyzer.documents.steering import steering_comparison
from services.analyzer.documents.vectors import vector_comparison
from services.analyzer.loading import RunArtefacts

__all__ = ["DOCUMENTS", "SCHEMA", "Documents", "build_all"]

DOCUMENTS = (
    "vector_comparison.json",
    "steering_comparison.json",
    "logit_diff_comparison.json",
    "benchmark_comparison.json",
    "robustness_ranking.json",
    "probe_statistics.json",
)


@dataclass(frozen=True)
class Documents:
    """The six documents of one analysis, typed."""

    vectors: VectorComparison
    steering: SteeringComparison
    logit_diff: LogitDiffComparison
    benchmarks: BenchmarkComparison
    ranking: RobustnessRanking
    safety: ProbeStatistics

    def by_name(self) -> dict[str, AnalysisDocument]:
        """File name -> document, in :data:`DOCUMENTS` order."""
        docs = (self.vectors, self.steering, self.logit_diff, self.benchmarks, self.ranking)
        return dict(zip(DOCUMENTS, (*docs, self.safety), strict=True))


def build_all(run: RunArtefacts) -> Documents:
    """Every analysis document."""
    # The both-directions lists (2x2 replay, cross-precision each way) join their documents.
    vectors = vector_comparison(run).model_copy(update={"replay_2x2": replay_2x2(run)})
    steering = steering_comparison(run).model_copy(update={"both_directions": steering_both(run)})
    logit_diff = logit_diff_comparison(run).model_copy(
        update={"both_directions": logit_diff_both(run)}
    )
    benchmarks = benchmark_comparison(run)
    return Documents(
        vectors=vectors,
        steering=steering,
        logit_diff=logit_diff,
        benchmarks=benchmarks,
        ranking=robustness_ranking(run, vectors, steering, benchmarks),
        safety=probe_statistics(run),
    )
