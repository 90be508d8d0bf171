"""Ablate mode of the steer job (Arditi et al. 2024, refusal): choose the direction's layer on
the selection set when there are several candidates, then evaluate its ablation once.

The unit direction is projected out after every decoder layer (coefficient 1). With several
candidate layers and a selection set (harmful *validation* instructions), the layer whose
ablation best achieves the objective there is chosen in one batch; the chosen ablation is then
evaluated on the main set (with the unsteered baseline in the same batch when none is stored).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.contracts.steer import SteerParams
from services.common.contracts.steer_results import SteerRun
from services.steerer.context import Heartbeat, no_heartbeat
from services.steerer.evaluation import UNSTEERED, Evaluation, Setting, SteeringEvaluator
from services.steerer.search import Candidate, Outcome, best_outcome
from services.steerer.sources import VectorSource
from services.steerer.steer_runs import steer_run

__all__ = ["run_ablation"]


async def run_ablation(
    main: SteeringEvaluator,
    picker: SteeringEvaluator | None,
    source: VectorSource,
    layers: Sequence[int],
    params: SteerParams,
    *,
    num_layers: int,
    with_baseline: bool,
    heartbeat: Heartbeat = no_heartbeat,
) -> tuple[list[SteerRun], Evaluation | None]:
    """The runs (selection, then the ablation) and the baseline evaluated with them, if asked.

    ``picker`` evaluates the selection set; None (no selection set or one candidate layer)
    ablates the first candidate layer.
    """
    threshold = params.judge.coherence_threshold
    runs: list[SteerRun] = []
    baseline_eval: Evaluation | None = None
    all_layers = tuple(range(num_layers))
    vectors = [source.vector(layer) for layer in layers]
    chosen = layers[0]
    if picker is not None:
        settings = [Setting(all_layers, 1.0, i, "ablate") for i in range(len(layers))]
        trials = await picker.evaluate(settings, vectors)
        outcomes = []
        for layer, e in zip(layers, trials, strict=True):
            run = steer_run(
                len(runs),
                e,
                phase="select",
                step=1,
                layer=None,
                vector_layer=layer,
                source=source,
                threshold=threshold,
                question_set=picker.question_set,
            )
            runs.append(run)
            outcomes.append(
                Outcome(
                    Candidate(layer, 1.0, "coarse", 1),
                    e.stats.mean_trait,
                    e.stats.mean_coherence if e.coherence_ok else None,
                    eligible=e.eligible,
                )
            )
        maximize = params.direction == "+"
        pick = best_outcome(outcomes, threshold, maximize=maximize) or best_outcome(
            outcomes, -1.0, maximize=maximize
        )
        chosen = pick.layer if pick is not None else layers[len(layers) // 2]
        await heartbeat()
    settings = [Setting(all_layers, 1.0, layers.index(chosen), "ablate")]
    if with_baseline:
        settings.insert(0, UNSTEERED)
    evaluations = await main.evaluate(settings, vectors)
    if with_baseline:
        baseline_eval = evaluations.pop(0)
    runs.append(
        steer_run(
            len(runs),
            evaluations[0],
            phase="ablate",
            step=2,
            layer=None,
            vector_layer=chosen,
            source=source,
            threshold=threshold,
            question_set=main.question_set,
        )
    )
    await heartbeat()
    return runs, baseline_eval
