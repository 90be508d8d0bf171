"""The chosen setting scored again: on held-out questions (winner's curse) and, for the
reference, replicated to measure the noise floor (issue 17, "Numbers a reader can trust").

The search picks its best (layer, coefficient) on the first ``steering.questions`` of the
trait's steering questions, so its score there is biased upwards. The next
``steering.held_out`` questions (disjoint from the search's and from extraction data) score
the chosen setting and the unsteered model once more, in one loader batch.

The noise floor (``noise_floor`` jobs) replicates that measurement where only chance changes:

* ``questions``: ``repeats`` other samples of as many questions from the search's and the
  held-out questions together (greedy answers: the search's best run and baseline on its
  questions, the held-out batch on the rest; nothing is generated again);
* ``seeds``: the held-out questions answered again at ``noise.temperature`` with ``repeats``
  sampling seeds (one batch: steered and unsteered rows, each copy with its own row seed);
* ``rejudge``: the held-out greedy answers judged ``repeats`` more times, fresh (the judge's
  backend scores them again instead of its verdict cache answering): the judge's own
  nondeterminism. A deterministic judge (the embedding heuristic, a rule-based endpoint) gives
  a measured SD of 0, which counts; only a re-judging the cache still answered is left out.

Each replicate's statistic is the steering effect: the signed mean paired (steered -
unsteered) trait score over its questions, the quantity compared across precisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.contracts.steer_results import HeldOutScore, NoiseComponent, NoiseFloor
from services.common.spec import SteeringSpec
from services.steerer.evaluation import UNSTEERED, Evaluation, Setting, SteeringEvaluator
from services.steerer.stats import bootstrap_paired_delta

__all__ = ["BAND_Z", "Rescore", "noise_band", "paired_effect", "rescore"]

# A 95% band for the difference of two effects that are each this noisy.
BAND_Z = 1.959963984540054 * math.sqrt(2.0)


@dataclass
class Rescore:
    """What re-scoring needs from the steer job."""

    evaluator_for: Callable[[list[str]], SteeringEvaluator]  # questions -> an evaluator
    setting: Setting  # the chosen setting (vector index 0)
    vectors: list[np.ndarray]  # [the signed vector of the chosen layer]
    sign: float  # +1 when the job maximised the trait, -1 when it minimised it
    pool: list[str]  # every steering question of the trait
    n_search: int  # the first n_search of the pool are the search's
    # The search's greedy trait scores on its own questions: (chosen setting, unsteered).
    search_values: tuple[list[float | None], list[float | None]] = ([], [])


def paired_effect(
    steered: Sequence[float | None], base: Sequence[float | None], keep: Iterable[int], sign: float
) -> float | None:
    """Signed mean of (steered - unsteered) trait scores over the questions ``keep`` scored in
    both."""
    diffs = [s - b for i in keep if (s := steered[i]) is not None and (b := base[i]) is not None]
    return sign * math.fsum(diffs) / len(diffs) if diffs else None


def _sd(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def noise_band(components: Sequence[NoiseComponent]) -> tuple[float | None, float | None]:
    """(sd, band): the components' SDs added in quadrature, and ``BAND_Z * sd``."""
    sds = [c.sd for c in components if c.sd is not None]
    if not sds:
        return None, None
    sd = math.sqrt(math.fsum(x * x for x in sds))
    return sd, BAND_Z * sd


async def rescore(
    r: Rescore, steering: SteeringSpec, *, noise: bool
) -> tuple[HeldOutScore | None, NoiseFloor | None, list[SteeringEvaluator]]:
    """The held-out score of the chosen setting and, with ``noise``, its noise floor."""
    held = r.pool[r.n_search : r.n_search + steering.held_out]
    if not held:
        return None, None, []
    greedy = r.evaluator_for(held)
    base, best = await greedy.evaluate([UNSTEERED, r.setting], r.vectors)
    held_out = HeldOutScore(
        questions=held,
        n=len(held),
        mean_trait=_mean(best.trait_values),
        mean_coherence=_mean([a.coherence.used for a in best.answers]),
        baseline_trait=_mean(base.trait_values),
        delta=paired_effect(best.trait_values, base.trait_values, range(len(held)), 1.0),
        delta_ci=bootstrap_paired_delta(
            best.trait_values,
            base.trait_values,
            resamples=steering.bootstrap,
            seed=steering.seed,
        ),
        trait_values=list(best.trait_values),
        baseline_values=list(base.trait_values),
    )
    if not noise:
        return held_out, None, [greedy]
    floor, used = await _noise_floor(r, steering, greedy, (base, best))
    return held_out, floor, [greedy, *used]


async def _noise_floor(
    r: Rescore,
    steering: SteeringSpec,
    greedy: SteeringEvaluator,
    pair: tuple[Evaluation, Evaluation],
) -> tuple[NoiseFloor, list[SteeringEvaluator]]:
    spec, (base, best) = steering.noise, pair
    held = greedy.questions
    n = len(held)
    # Greedy answers to every question so far: the search's, then the held-out ones.
    steered = [*r.search_values[0], *best.trait_values]
    unsteered = [*r.search_values[1], *base.trait_values]
    rng = np.random.Generator(np.random.PCG64(steering.seed))
    samples = [rng.choice(len(steered), size=n, replace=False) for _ in range(spec.repeats)]
    components = [
        NoiseComponent(
            source="questions",
            description=f"{spec.repeats} samples of {n} of the {len(steered)} steering "
            "questions answered so far (greedy)",
            effects=[
                paired_effect(steered, unsteered, [int(i) for i in s], r.sign) for s in samples
            ],
            sd=None,
        )
    ]
    # Every seed replicate in one batch: the held-out questions repeated, each copy with its
    # own row seed (the loader samples each row from its own seed).
    sampler = r.evaluator_for(held * spec.repeats)
    sampler.temperature = spec.temperature
    sampler.question_seeds = [steering.seed + 1 + k for k in range(spec.repeats) for _ in held]
    s_base, s_best = await sampler.evaluate([UNSTEERED, r.setting], r.vectors)
    effects = [
        paired_effect(s_best.trait_values, s_base.trait_values, range(k * n, (k + 1) * n), r.sign)
        for k in range(spec.repeats)
    ]
    components.append(
        NoiseComponent(
            source="seeds",
            description=f"the {n} held-out questions sampled at temperature "
            f"{spec.temperature:g} with {spec.repeats} seeds",
            effects=effects,
            sd=None,
        )
    )
    if spec.rejudge:
        components.append(await _rejudged(r, greedy, (base, best), spec.repeats))
    components = [c if c.note else c.model_copy(update={"sd": _sd(c.effects)}) for c in components]
    sd, band = noise_band(components)
    floor = NoiseFloor(
        n=n,
        repeats=spec.repeats,
        temperature=spec.temperature,
        components=components,
        sd=sd,
        band=band,
    )
    return floor, [sampler]


async def _rejudged(
    r: Rescore,
    greedy: SteeringEvaluator,
    pair: tuple[Evaluation, Evaluation],
    repeats: int,
) -> NoiseComponent:
    """The held-out greedy answers judged ``repeats`` more times, each a fresh judging."""
    effects: list[float | None] = []
    cached = judged = 0
    n = len(greedy.questions)
    for _ in range(repeats):
        j_base, j_best = await greedy.judge_again(pair)
        effects.append(paired_effect(j_best.trait_values, j_base.trait_values, range(n), r.sign))
        cached, judged = cached + greedy.last_cached, judged + 4 * len(greedy.questions)
    note = None
    if cached == judged:
        # Fresh judgings bypass the cache; should a judge service answer from it anyway, that
        # says nothing about how much the judge itself varies and must not narrow the band.
        note = "every verdict came from the judge's cache; not counted in the band"
    return NoiseComponent(
        source="rejudge",
        description=f"the {n} held-out greedy answers judged afresh {repeats} more times "
        f"({judged - cached} of {judged} verdicts scored again by the judge's backend)",
        effects=effects,
        sd=None,
        note=note,
    )


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs else None
