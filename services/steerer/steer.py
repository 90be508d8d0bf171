"""The ``steer`` job: adaptive coefficient search (or directional ablation) with judged answers.

Add mode, per job:

1. load the source extraction's vectors and activation norms (``sources``), pick candidate
   layers, and start each layer at ``c0 = init_fraction * activation_norm / ||v||``;
2. the unsteered baseline of the target on the question set is read from
   ``baseline/<m>/<t>/<set_id>/answers.jsonl`` when an earlier job wrote it, else generated in
   the first search step's batch and written there (write-once: a concurrent job that loses
   the race re-reads the winner's, so every job of a variant compares against one baseline);
3. each search step (``search.CoefficientSearch``) is ONE loader batch (every layer's candidate
   x every question, steered per row) and ONE judge batch (trait + coherence);
4. the best run — highest mean trait score (lowest when steering away, direction ``-``) with
   mean coherence >= the threshold — gets its paired delta vs the baseline with a bootstrap
   interval over questions;
5. the best setting is scored again on ``steering.held_out`` questions the search never saw,
   and on the reference's own jobs (``noise_floor``) replicated for the noise floor
   (``held_out``).

Ablate mode (Arditi et al. 2024, refusal): the unit direction is projected out after every
decoder layer (coefficient 1). With several candidate layers, the direction whose ablation
best achieves the objective on the harmful *validation* instructions is chosen in one batch,
then evaluated once on the harmful *test* instructions against the unsteered baseline there
(``ablation``). Run records, budgets and the best runs are built in ``steer_runs``.

``runs.jsonl`` (every run with its answers) is written before ``result.json``; the presence of
``result.json`` means the job is complete: the handler returns it at once for a redelivered job,
before it looks for a loader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from services.common.artefacts import baseline_key, steer_key
from services.common.contracts.steer import SteerParams, steer_parts, steer_result_key
from services.common.contracts.steer_results import (
    BaselineRow,
    BaselineSummary,
    QuestionSet,
    SteerResult,
    SteerRun,
)
from services.common.errors import FailedPrecondition, NotFound
from services.common.hashing import stable_hash
from services.common.logging import get_logger
from services.common.methodologies import methodology_info
from services.common.store import AsyncS3Store
from services.extractor.datasets import TraitDataset, load_trait
from services.judge.client import JudgeClient, trait_rubric
from services.loader.capabilities import Needs
from services.loader.client import LoaderClient, LoaderInfo
from services.steerer.ablation import run_ablation
from services.steerer.context import Heartbeat, add_calls, loader_record, no_heartbeat
from services.steerer.evaluation import (
    UNSTEERED,
    Evaluation,
    Setting,
    SteeringEvaluator,
    run_stats,
)
from services.steerer.held_out import Rescore, rescore
from services.steerer.search import Candidate, CoefficientSearch, Outcome
from services.steerer.sources import (
    VectorSource,
    candidate_layers,
    compare_with_extraction,
    load_vector_source,
    start_coefficient,
)
from services.steerer.stats import bootstrap_mean
from services.steerer.steer_runs import best_runs, run_budget, steer_run

__all__ = ["SearchOutput", "run_search", "run_steer", "steer_needs", "steer_summary"]

log = get_logger(__name__)

QuestionKind = Literal["eval", "harmful_test", "harmful_val"]


def steer_needs(params: SteerParams) -> Needs:
    """What a steer job asks of its loader: generation steered in its mode, at the
    methodology's positions when adding and at every position when ablating (``ablation``'s
    settings)."""
    positions = methodology_info(params.trait.methodology).steer_positions
    return Needs.of(
        "generate", steering=[(params.mode, positions if params.mode == "add" else "all")]
    )


@dataclass
class _Questions:
    kind: QuestionKind
    questions: list[str]


def _limit(items: Sequence[str], n: int | None) -> list[str]:
    return list(items if n is None else items[:n])


def _questions(dataset: TraitDataset, params: SteerParams) -> tuple[_Questions, _Questions | None]:
    """(evaluation set, selection set for ablation or None)."""
    n = params.steering.questions
    if params.mode == "add":
        return _Questions("eval", _limit(dataset.eval_questions, n)), None
    if not methodology_info(dataset.methodology).ablation:
        raise FailedPrecondition(
            f"directional ablation is evaluated on harmful instructions; {dataset.name} is a "
            f"{dataset.methodology} trait without them (ablation applies to arditi traits)"
        )
    test = dataset.harmful_test or dataset.harmful_val
    kind: QuestionKind = "harmful_test" if dataset.harmful_test else "harmful_val"
    selection = None
    if dataset.harmful_test and dataset.harmful_val:
        selection = _Questions("harmful_val", _limit(dataset.harmful_val, n))
    if not test:
        raise FailedPrecondition(f"{dataset.name} has no harmful val/test instructions")
    return _Questions(kind, _limit(test, n)), selection


def _set_id(
    kind: str, questions: Sequence[str], params: SteerParams, trait_hash: str, coherence_hash: str
) -> str:
    identity = {
        "questions": list(questions),
        "max_new_tokens": params.steering.max_new_tokens,
        "seed": params.steering.seed,
        "temperature": 0.0,
        "judge": [
            params.judge.backend,
            params.judge.model if params.judge.backend == "openai" else "",
        ],
        "rubrics": [trait_hash, coherence_hash],
    }
    return f"{kind}-{stable_hash(identity, 12)}"


@dataclass
class SearchOutput:
    """What a coefficient search produced (also used by the benchmark script)."""

    runs: list[SteerRun]
    search: CoefficientSearch
    baseline: Evaluation | None


async def run_search(
    evaluator: SteeringEvaluator,
    source: VectorSource,
    layers: Sequence[int],
    params: SteerParams,
    *,
    with_baseline: bool,
    heartbeat: Heartbeat = no_heartbeat,
) -> SearchOutput:
    """The adaptive search over ``layers``; the unsteered baseline rides in the first batch."""
    sign = -1.0 if params.direction == "-" else 1.0
    vectors = [np.asarray(sign * source.vector(layer), dtype=np.float32) for layer in layers]
    index = {layer: i for i, layer in enumerate(layers)}
    spec = params.steering.search
    starts = {}
    for layer in layers:
        act = source.activation_norm(layer)
        assert act is not None
        starts[layer] = start_coefficient(spec.init_fraction, act, source.norm(layer))
    threshold = params.judge.coherence_threshold
    search = CoefficientSearch(starts, spec, threshold=threshold, maximize=params.direction == "+")
    positions = methodology_info(params.trait.methodology).steer_positions
    runs: list[SteerRun] = []
    baseline: Evaluation | None = None
    pending_baseline = with_baseline
    while True:
        candidates: list[Candidate] = search.propose()
        if not candidates:
            break
        settings = [
            Setting((c.layer,), c.coefficient, index[c.layer], positions=positions)
            for c in candidates
        ]
        if pending_baseline:
            settings.insert(0, UNSTEERED)
        evaluations = await evaluator.evaluate(settings, vectors)
        if pending_baseline:
            baseline = evaluations.pop(0)
            pending_baseline = False
        outcomes = []
        for c, e in zip(candidates, evaluations, strict=True):
            outcomes.append(
                Outcome(
                    c,
                    e.stats.mean_trait,
                    e.stats.mean_coherence if e.coherence_ok else None,
                    eligible=e.eligible,
                )
            )
            runs.append(
                steer_run(
                    len(runs),
                    e,
                    phase=c.phase,
                    step=c.step,
                    layer=c.layer,
                    vector_layer=c.layer,
                    source=source,
                    threshold=threshold,
                    question_set=evaluator.question_set,
                )
            )
        search.observe(outcomes)
        log.info(
            "search step",
            extra={"step": search.step, "settings": len(candidates), "runs": len(runs)},
        )
        await heartbeat()
    if pending_baseline:
        baseline = (await evaluator.evaluate([UNSTEERED], vectors))[0]
    return SearchOutput(runs, search, baseline)


async def _read_baseline(store: AsyncS3Store, key: str) -> list[BaselineRow] | None:
    try:
        rows = await store.get_jsonl(key)
    except NotFound:
        return None
    return [BaselineRow.model_validate(row) for row in rows]


def steer_summary(result: SteerResult, key: str) -> dict[str, Any]:
    """The small job-record summary of a steer result."""
    best = result.best
    return {
        "key": key,
        "status": result.status,
        "runs": len(result.runs),
        "runs_per_cell": result.budget.runs_per_cell,
        "baseline_trait": result.baseline.mean_trait,
        "best": None
        if best is None
        else {
            "layer": best.layer,
            "coefficient": best.coefficient,
            "mean_trait": best.mean_trait,
            "mean_coherence": best.mean_coherence,
            "delta": best.delta,
            "delta_ci": [best.delta_ci.low, best.delta_ci.high],
        },
    }


@dataclass
class _Job:
    """A steer job's inputs, resolved before anything is evaluated."""

    run_id: str
    params: SteerParams
    dataset: TraitDataset
    info: LoaderInfo
    source: VectorSource
    compared: dict[str, dict[str, float | None]] | None
    main_set: _Questions
    selection_set: _Questions | None
    main: SteeringEvaluator
    set_id: str
    base_key: str
    stored_baseline: list[BaselineRow] | None
    layers: list[int]
    skipped: dict[str, str]
    make_evaluator: Callable[[_Questions], SteeringEvaluator]


@dataclass
class _Evaluated:
    """What the search (add) or the ablation produced."""

    runs: list[SteerRun]
    search: CoefficientSearch | None
    baseline_eval: Evaluation | None
    calls_from: list[SteeringEvaluator]


async def run_steer(
    run_id: str,
    params: SteerParams,
    *,
    store: AsyncS3Store,
    loader: LoaderClient,
    judge: JudgeClient,
    heartbeat: Heartbeat = no_heartbeat,
) -> dict[str, Any]:
    """Run one steer job and write its artefacts; returns the job-record summary."""
    keys = steer_parts(run_id, params)
    result_key = steer_result_key(run_id, params)
    started = time.monotonic()
    job = await _prepare(run_id, params, store=store, loader=loader, judge=judge)
    done = await _evaluate(job, heartbeat)
    # The baseline: ours if we generated it and won the write, else the stored one.
    stored_baseline, reused = await _store_baseline(
        store, job.base_key, job.stored_baseline, done.baseline_eval, job.main, params, job.set_id
    )
    assert stored_baseline is not None
    result = _result(job, done, stored_baseline, reused, started)
    result = await _rescored(
        job, result, _search_values(result, done.runs, stored_baseline), started
    )
    runs_key = steer_key(*keys, "runs.jsonl")
    await store.put_jsonl(runs_key, [r.model_dump(mode="json") for r in done.runs])
    if not await store.put_json(result_key, result.model_dump(mode="json")):
        # A concurrent attempt finished first: its result is the one of record.
        result = SteerResult.model_validate(await store.get_json(result_key))
    return steer_summary(result, result_key)


async def _prepare(
    run_id: str,
    params: SteerParams,
    *,
    store: AsyncS3Store,
    loader: LoaderClient,
    judge: JudgeClient,
) -> _Job:
    """Load the trait, the loader's facts, the vectors and the stored baseline; pick layers."""
    dataset = await asyncio.to_thread(load_trait, params.trait.ref)
    info = await loader.info()
    imported = params.vectors_location
    source = await load_vector_source(
        store,
        run_id,
        params.target if imported else params.source,  # imported: the target's norms
        params.trait.name,
        params.method,
        params.vector_mode,
        location=imported,
    )
    # An imported set is compared with the target's own extraction (cosine per layer).
    compared = await compare_with_extraction(store, run_id, source) if imported else None
    if source.vectors.hidden_size != info.hidden_size:
        raise FailedPrecondition(
            f"{params.source}'s vectors have {source.vectors.hidden_size} dimensions; "
            f"{params.target} has hidden size {info.hidden_size} (different models?)"
        )
    main_set, selection_set = _questions(dataset, params)
    rubric = trait_rubric(dataset.eval_prompt, dataset.exemplars.pos, dataset.exemplars.neg)
    steering = params.steering
    refusal_is_trait = methodology_info(dataset.methodology).harmful_instructions

    def evaluator(qs: _Questions) -> SteeringEvaluator:
        return SteeringEvaluator(
            loader,
            judge,
            questions=qs.questions,
            trait=params.trait.name,
            rubric=rubric,
            max_new_tokens=steering.max_new_tokens,
            seed=steering.seed,
            expected_backend=params.judge.backend,
            expected_model=params.judge.model if params.judge.backend == "openai" else None,
            refusal_is_trait=refusal_is_trait,
            question_set=qs.kind,
        )

    main = evaluator(main_set)
    set_id = _set_id(
        main_set.kind,
        main_set.questions,
        params,
        main.expected_trait_hash,
        main.expected_coherence_hash,
    )
    base_key = baseline_key(run_id, params.target, params.trait.name, set_id, "answers.jsonl")
    stored_baseline = await _read_baseline(store, base_key)
    layers, skipped = _steer_layers(source, info.num_layers, params)
    return _Job(
        run_id=run_id,
        params=params,
        dataset=dataset,
        info=info,
        source=source,
        compared=compared,
        main_set=main_set,
        selection_set=selection_set,
        main=main,
        set_id=set_id,
        base_key=base_key,
        stored_baseline=stored_baseline,
        layers=layers,
        skipped=skipped,
        make_evaluator=evaluator,
    )


async def _evaluate(job: _Job, heartbeat: Heartbeat) -> _Evaluated:
    """The coefficient search (add) or the direction choice and its evaluation (ablate)."""
    params, layers = job.params, job.layers
    with_baseline = job.stored_baseline is None
    calls_from: list[SteeringEvaluator] = [job.main]
    if params.mode == "add":
        out = await run_search(
            job.main, job.source, layers, params, with_baseline=with_baseline, heartbeat=heartbeat
        )
        return _Evaluated(out.runs, out.search, out.baseline, calls_from)
    selection_set = job.selection_set
    picker = None
    if selection_set is not None and len(layers) > 1:
        picker = job.make_evaluator(selection_set)
        calls_from.append(picker)
    runs, baseline_eval = await run_ablation(
        job.main,
        picker,
        job.source,
        layers,
        params,
        num_layers=job.info.num_layers,
        with_baseline=with_baseline,
        heartbeat=heartbeat,
    )
    return _Evaluated(runs, None, baseline_eval, calls_from)


def _search_values(
    result: SteerResult, runs: list[SteerRun], baseline: list[BaselineRow]
) -> tuple[list[float | None], list[float | None]]:
    """The best run's and the baseline's trait scores on the search's questions, in order
    (the noise floor's question samples reuse them)."""
    best = result.best
    run = next((r for r in runs if best is not None and r.run_index == best.run_index), None)
    if run is None:
        return [], []
    steered = {a.index: a.trait.used for a in run.answers}
    unsteered = {row.index: row.trait.used for row in baseline}
    n = result.questions.count
    return [steered.get(i) for i in range(n)], [unsteered.get(i) for i in range(n)]


async def _rescored(
    job: _Job,
    result: SteerResult,
    search_values: tuple[list[float | None], list[float | None]],
    started: float,
) -> SteerResult:
    """The result with its best setting scored on held-out questions (and, for noise-floor
    jobs, replicated: ``held_out``)."""
    params, best = job.params, result.best
    if params.mode != "add" or best is None or best.layer is None:
        return result
    sign = -1.0 if params.direction == "-" else 1.0
    vector = np.asarray(sign * job.source.vector(best.layer), dtype=np.float32)
    positions = methodology_info(params.trait.methodology).steer_positions
    plan = Rescore(
        evaluator_for=lambda qs: job.make_evaluator(_Questions("eval", qs)),
        setting=Setting((best.layer,), best.coefficient, 0, positions=positions),
        vectors=[vector],
        sign=sign,
        pool=list(job.dataset.eval_questions),
        n_search=len(job.main_set.questions),
        search_values=search_values,
    )
    held, noise, used = await rescore(plan, params.steering, noise=params.noise_floor)
    calls = result.calls
    for evaluator in used:
        calls = add_calls(calls, evaluator.calls)
    update = {"held_out": held, "noise": noise, "calls": calls}
    return result.model_copy(update={**update, "seconds": round(time.monotonic() - started, 3)})


def _baseline_summary(
    job: _Job, rows: list[BaselineRow], reused: bool
) -> tuple[BaselineSummary, list[float | None]]:
    """The baseline's summary in the result, and its per-question trait scores."""
    steering = job.params.steering
    base_values = [row.trait.used for row in rows]
    summary = BaselineSummary(
        **run_stats(rows).model_dump(),
        key=job.base_key,
        set_id=job.set_id,
        reused=reused,
        trait_ci=bootstrap_mean(base_values, resamples=steering.bootstrap, seed=steering.seed),
    )
    return summary, base_values


def _result(
    job: _Job, done: _Evaluated, rows: list[BaselineRow], reused: bool, started: float
) -> SteerResult:
    """The job's ``result.json`` document."""
    params, main_set, layers = job.params, job.main_set, job.layers
    steering = params.steering
    baseline, base_values = _baseline_summary(job, rows, reused)
    final_runs = [r for r in done.runs if r.question_set == main_set.kind]
    best, per_layer, status = best_runs(final_runs, layers, params, base_values)
    budget, brackets = run_budget(done.search, steering.search.budget, done.runs, layers)
    provenance = job.main.provenance
    if provenance is None:
        raise FailedPrecondition("the judge returned no verdicts to record provenance from")
    calls = job.main.calls
    for extra in done.calls_from[1:]:
        calls = add_calls(calls, extra.calls)
    return SteerResult(
        run_id=job.run_id,
        target=params.target,
        source=params.source,
        cross_precision=params.source != params.target,
        trait=params.trait.name,
        methodology=job.dataset.methodology,
        method=params.method,
        vector_mode=params.vector_mode,
        mode=params.mode,
        direction=params.direction,
        objective="max" if params.direction == "+" else "min",
        coherence_threshold=params.judge.coherence_threshold,
        questions=QuestionSet(
            kind=main_set.kind,
            set_id=job.set_id,
            count=len(main_set.questions),
            questions=main_set.questions,
        ),
        generation={
            "max_new_tokens": steering.max_new_tokens,
            "temperature": 0.0,
            "seed": steering.seed,
            "positions": "all",
            "prompt": "the question as the only user message (chat template, no system prompt)",
        },
        search=steering.search.model_dump(mode="json"),
        budget=budget,
        layers=layers,
        skipped_layers=job.skipped,
        vector=_vector_record(job.source, params, layers, job.compared),
        judge=provenance,
        baseline=baseline,
        runs=[r.model_copy(update={"answers": []}) for r in done.runs],
        best=best,
        best_per_layer=per_layer,
        status=status,
        brackets=brackets,
        bootstrap={
            "resamples": steering.bootstrap,
            "seed": steering.seed,
            "level": 0.95,
            "unit": "question",
        },
        loader=loader_record(job.info),
        calls=calls,
        seconds=round(time.monotonic() - started, 3),
    )


async def _store_baseline(
    store: AsyncS3Store,
    base_key: str,
    stored_baseline: list[BaselineRow] | None,
    baseline_eval: Evaluation | None,
    main: SteeringEvaluator,
    params: SteerParams,
    set_id: str,
) -> tuple[list[BaselineRow] | None, bool]:
    """The baseline rows of record and whether they were reused (written by another job)."""
    reused = stored_baseline is not None
    if baseline_eval is not None:
        rows = [
            BaselineRow(
                **a.model_dump(),
                set_id=set_id,
                judge_backend=main.provenance.backend if main.provenance else params.judge.backend,
                judge_model=main.provenance.model if main.provenance else "",
                trait_rubric_hash=main.expected_trait_hash,
                coherence_rubric_hash=main.expected_coherence_hash,
            )
            for a in baseline_eval.answers
        ]
        if await store.put_jsonl(base_key, [r.model_dump(mode="json") for r in rows]):
            stored_baseline = rows
        else:
            stored_baseline = await _read_baseline(store, base_key)
            reused = True
    return stored_baseline, reused


def _steer_layers(
    source: VectorSource, num_layers: int, params: SteerParams
) -> tuple[list[int], dict[str, str]]:
    """The candidate layers to steer at, and the skipped ones with why (FailedPrecondition when
    none is usable)."""
    steering = params.steering
    usable = [layer for layer in source.layers if source.usable(layer) is None]
    wanted = candidate_layers(
        num_layers,
        usable,
        layers=steering.layers,
        n_layers=steering.n_layers,
        layer_range=steering.layer_range,
    )
    skipped = {str(layer): why for layer in wanted if (why := source.usable(layer)) is not None}
    layers = [layer for layer in wanted if str(layer) not in skipped]
    if not layers:
        raise FailedPrecondition(
            f"no candidate layer of {params.source}'s {params.method} vectors is usable: {skipped}"
        )
    return layers, skipped


def _vector_record(
    source: VectorSource,
    params: SteerParams,
    layers: list[int],
    compared: dict[str, dict[str, float | None]] | None,
) -> dict[str, Any]:
    """The steering vector's record in the result: keys, sign, norms and where it came from."""
    imported = params.vectors_location
    return {
        "summary_key": source.summary_key,
        "vectors_key": source.vectors_key,
        "sign": -1 if params.direction == "-" else 1,
        "norms": {str(layer): source.norm(layer) for layer in layers},
        "activation_norm": {str(layer): source.activation_norm(layer) for layer in layers},
        "source_precision": "imported" if imported else source.summary.precision,
        "imported_from": imported,
        "cosine_to_extracted": compared,
    }
