"""A steer job's run records: one ``SteerRun`` per evaluated setting, the best run with its
paired delta to the baseline, and picking the best run under the coherence threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from services.common.contracts.steer import SteerParams
from services.common.contracts.steer_results import BestRun, Budget, SteerRun
from services.steerer.evaluation import Evaluation
from services.steerer.search import Candidate, CoefficientSearch, Outcome, best_outcome
from services.steerer.sources import VectorSource
from services.steerer.stats import bootstrap_mean, bootstrap_paired_delta

__all__ = ["best_run_of", "best_runs", "pick_run", "run_budget", "steer_run"]


def steer_run(
    index: int,
    evaluation: Evaluation,
    *,
    phase: Literal["coarse", "fine", "select", "ablate"],
    step: int,
    layer: int | None,
    vector_layer: int,
    source: VectorSource,
    threshold: float,
    question_set: str,
) -> SteerRun:
    """The run record of one evaluated setting (its added and relative norms, coherence)."""
    s = evaluation.setting
    added = None
    relative = None
    if s.mode == "add":
        added = s.coefficient * source.norm(vector_layer)
        act = source.activation_norm(vector_layer)
        relative = added / act if act else None
    coherent = (
        evaluation.coherence_ok
        and evaluation.stats.mean_coherence is not None
        and evaluation.stats.mean_coherence >= threshold
    )
    return SteerRun(
        **evaluation.stats.model_dump(),
        run_index=index,
        phase=phase,
        step=step,
        layer=layer,
        layers=list(s.layers),
        vector_layer=vector_layer,
        coefficient=s.coefficient,
        added_norm=added,
        relative_norm=relative,
        coherent=coherent,
        eligible=evaluation.eligible,
        question_set=question_set,
        answers=evaluation.answers,
    )


def best_run_of(
    run: SteerRun, baseline: Sequence[float | None], *, resamples: int, seed: int
) -> BestRun:
    """``run`` with its trait interval and paired delta to ``baseline`` (bootstrap over questions)."""
    values = [a.trait.used for a in run.answers]
    assert run.mean_trait is not None and run.mean_coherence is not None
    delta_ci = bootstrap_paired_delta(values, baseline, resamples=resamples, seed=seed)
    return BestRun(
        run_index=run.run_index,
        phase=run.phase,
        layer=run.layer,
        layers=run.layers,
        vector_layer=run.vector_layer,
        coefficient=run.coefficient,
        added_norm=run.added_norm,
        relative_norm=run.relative_norm,
        mean_trait=run.mean_trait,
        mean_coherence=run.mean_coherence,
        n=run.n,
        trait_ci=bootstrap_mean(values, resamples=resamples, seed=seed),
        delta=delta_ci.value,
        delta_ci=delta_ci,
    )


def pick_run(runs: Sequence[SteerRun], threshold: float, maximize: bool) -> SteerRun | None:
    """The best of ``runs`` by the search's rule (coherent first), or None."""
    outcomes = {
        id(r): Outcome(
            Candidate(r.layer if r.layer is not None else -1, r.coefficient, "coarse", r.step),
            r.mean_trait,
            r.mean_coherence if r.coherent else None,
            eligible=r.eligible,
        )
        for r in runs
    }
    best = best_outcome(outcomes.values(), threshold, maximize=maximize)
    if best is None:
        return None
    return next(r for r in runs if outcomes[id(r)] is best)


def run_budget(
    search: CoefficientSearch | None,
    mode: Literal["adaptive", "equal"],
    runs: list[SteerRun],
    layers: list[int],
) -> tuple[Budget, dict[str, list[float | None]]]:
    """The run budget record and each layer's final coefficient bracket (add mode)."""
    if search is not None:
        budget = Budget(
            mode=mode,
            budget_per_cell=search.budget_per_cell,
            runs_per_cell={str(k): v for k, v in search.runs_per_cell().items()},
            total_runs=len(runs),
        )
        brackets: dict[str, list[float | None]] = {str(k): list(search.bracket(k)) for k in layers}
    else:
        budget = Budget(
            mode="single",
            budget_per_cell=None,
            runs_per_cell={"all": sum(r.phase == "ablate" for r in runs)},
            total_runs=len(runs),
        )
        brackets = {}
    return budget, brackets


def best_runs(
    final_runs: list[SteerRun],
    layers: list[int],
    params: SteerParams,
    base_values: Sequence[float | None],
) -> tuple[BestRun | None, dict[str, BestRun], Literal["ok", "no_coherent_run"]]:
    """The best run of the main set, the best per layer (add mode) and the job's status."""
    threshold = params.judge.coherence_threshold
    resamples, seed = params.steering.bootstrap, params.steering.seed
    maximize = params.direction == "+"
    best_run = pick_run(final_runs, threshold, maximize)
    if params.mode == "ablate":
        ablation = [r for r in final_runs if r.phase == "ablate"]
        best_run = ablation[0] if ablation and ablation[0].eligible else None
    best = (
        best_run_of(best_run, base_values, resamples=resamples, seed=seed)
        if best_run is not None and best_run.mean_coherence is not None
        else None
    )
    per_layer: dict[str, BestRun] = {}
    if params.mode == "add":
        for layer in layers:
            r = pick_run([x for x in final_runs if x.layer == layer], threshold, maximize)
            if r is not None:
                per_layer[str(layer)] = best_run_of(r, base_values, resamples=resamples, seed=seed)
    status: Literal["ok", "no_coherent_run"] = (
        "ok" if best_run is not None and best_run.coherent else "no_coherent_run"
    )
    return best, per_layer, status
