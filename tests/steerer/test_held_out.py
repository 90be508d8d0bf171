"""The chosen setting scored again on held-out questions, and the reference's noise floor
(issue 17, "Numbers a reader can trust"), on the toy loader and the rule-based toy judge."""

from __future__ import annotations

import math

import pytest

from services.common.contracts.steer_results import NoiseComponent
from services.common.jobs import JobKind
from services.common.planner import build_plan
from services.common.spec import spec_from_bytes
from services.common.state import JobState
from services.extractor.datasets import load_trait
from services.steerer.held_out import BAND_Z, noise_band
from tests.loader_procs import LoaderProc
from tests.steerer.conftest import Plane
from tests.steerer.test_steer import read_result, search_spec, steer_job, toy_vectors
from tests.steerer.toy import write_extraction


async def test_held_out_rescore_and_noise_floor(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    write_extraction(plane.store, run_id, "toy@fp32", "pv/evil", toy_vectors())
    search = search_spec(steps=4, fine_points=0, budget="equal")
    ref = steer_job(run_id, search=search, layers=[2], held_out=4, noise_floor=True)
    plain = steer_job(run_id, search=search, layers=[2], held_out=4, direction="-")
    records = await plane.run(run_id, [ref, plain])
    assert all(r.state == JobState.DONE for r in records), [r.error for r in records]
    # Held-out questions past the search's 18: up to 10, fewer where the pool ends first.
    tail_run = f"{run_id}-tail"
    write_extraction(plane.store, tail_run, "toy@fp32", "pv/evil", toy_vectors())
    tail = steer_job(tail_run, search=search, layers=[1], questions=18, held_out=10)
    records = await plane.run(tail_run, [tail])
    assert records[0].state == JobState.DONE, records[0].error
    pool = load_trait("pv/evil").eval_questions

    result, _ = read_result(plane, run_id, ref)
    held, best = result.held_out, result.best
    assert held is not None and best is not None
    # Held out: the 4 questions after the search's 3, none of them the search's.
    assert held.questions == list(pool[3:7]) and held.n == 4
    assert not set(held.questions) & set(result.questions.questions)
    # The toy answers by steering alone: the chosen setting scores the same on new questions,
    # the unsteered model its chain (10).
    assert held.mean_trait == best.mean_trait and held.baseline_trait == 10
    assert held.delta == pytest.approx(best.mean_trait - 10)
    assert held.trait_values == [best.mean_trait] * 4 and held.baseline_values == [10.0] * 4

    noise = result.noise
    assert noise is not None and noise.n == 4 and noise.repeats == 3
    by_source = {c.source: c for c in noise.components}
    assert set(by_source) == {"questions", "seeds", "rejudge"}
    # Samples of 4 of the 7 questions answered greedily so far (the search's 3 reused, the 4
    # held out): on the toy every sample gives the same effect, SD 0.
    assert "of the 7 steering questions" in by_source["questions"].description
    assert by_source["questions"].effects == [held.delta] * 3 and by_source["questions"].sd == 0
    # Sampling at temperature 0.7 moves the answers, and the effect with them.
    seeds = by_source["seeds"]
    assert len(seeds.effects) == 3 and all(e is not None for e in seeds.effects)
    assert seeds.sd is not None and seeds.sd > 0, seeds.effects
    # The re-judging is fresh: all 3 x 16 verdicts (4 answers x trait and coherence, steered
    # and unsteered) come from the judge's backend again, not its cache. The rule-based toy
    # judge is deterministic: a measured SD of 0 that counts in the band.
    rejudge = by_source["rejudge"]
    assert rejudge.effects == [held.delta] * 3
    assert "(48 of 48 verdicts scored again" in rejudge.description, rejudge.description
    assert rejudge.sd == 0 and rejudge.note is None
    assert noise.sd == pytest.approx(seeds.sd)
    assert noise.band == pytest.approx(BAND_Z * seeds.sd)
    # Work: the search's 4 steps, the held-out batch (4 questions x 2), one batch of the 3
    # seed replicates (4 x 2 each, a row seed per copy); judge: 4 + 1 + 1 + 3 re-judgings.
    assert result.calls.loader_calls == 4 + 1 + 1
    rows = 4 * 3 + 3 * (0 if result.baseline.reused else 1) + 8 + 3 * 8
    assert result.calls.loader_rows == rows
    assert result.calls.judge_calls == 9

    away, _ = read_result(plane, run_id, plain)
    assert away.held_out is not None and away.noise is None
    assert away.held_out.questions == list(pool[3:7])
    assert away.calls.loader_calls == 4 + 1

    short, _ = read_result(plane, tail_run, tail)
    assert short.held_out is not None and short.held_out.questions == list(pool[18:28])


def test_noise_band_adds_component_sds_in_quadrature() -> None:
    parts = [
        NoiseComponent(source="questions", description="", effects=[], sd=3.0),
        NoiseComponent(source="seeds", description="", effects=[], sd=4.0),
        NoiseComponent(source="rejudge", description="", effects=[], sd=None, note="cached"),
    ]
    sd, band = noise_band(parts)
    assert sd == 5.0 and band == pytest.approx(5.0 * 1.96 * math.sqrt(2), rel=1e-4)
    assert noise_band(parts[2:]) == (None, None)


SPEC = """
name: trust
models: [{name: toy, source: "tiny:llama", device: cpu}]
precisions: [fp32, bf16]
reference: fp32
traits: [pv/evil]
methods: [mean_diff]
judge: {backend: embedding}
steering: {questions: 4, held_out: 6, cross_precision: true}
"""


def test_planner_asks_the_reference_alone_for_the_noise_floor() -> None:
    plan = build_plan(spec_from_bytes(SPEC.encode()), "trust-1")
    steer = [j for j in plan.jobs if j.kind is JobKind.STEER]
    noisy = [j for j in steer if j.params.get("noise_floor")]
    assert [(j.params["target"], j.params["source"]) for j in noisy] == [("toy@fp32", "toy@fp32")]
    assert all("noise_floor" not in j.params for j in steer if j not in noisy)
    assert {j.params["steering"]["held_out"] for j in steer} == {6}
    off = spec_from_bytes(
        SPEC.replace("held_out: 6,", "held_out: 6, noise: {enabled: false},").encode()
    )
    assert not [j for j in build_plan(off, "trust-1").jobs if j.params.get("noise_floor")]
