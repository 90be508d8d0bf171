"""Both directions in the plan: the 2x2 replay's reverse extractions, the reference steered
with each variant's vectors, and CAA logit difference with the other variant's vectors --
emitted only when the spec asks, refused by name when the spec cannot have them."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.contracts.extract import ExtractParams
from services.common.contracts.kinds import parse_job_params
from services.common.contracts.steer import LogitDiffParams, SteerParams
from services.common.errors import InvalidArgument
from services.common.jobs import JobKind, RunPlan
from services.common.planner import build_plan
from services.common.resultkeys import check_result_keys
from services.common.spec import parse_spec
from services.common.spec.experiment import ExperimentSpec

REF, NF4, INT8 = "m@fp32", "m@nf4", "m@int8"


def _spec(**sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "both",
        "models": [{"name": "m", "source": "tiny:llama"}],
        "precisions": ["fp32", "nf4", "int8"],
        "reference": "fp32",
        "traits": ["pv/evil", "caa/sycophancy"],
        "methods": ["mean_diff"],
        "steering": {"ablation": False},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def _plan(**sections: Any) -> RunPlan:
    return build_plan(parse_spec(_spec(**sections)), "both-run")


def _params(plan: RunPlan, kind: JobKind) -> list[Any]:
    return [parse_job_params(j) for j in plan.jobs if j.kind is kind]


def test_2x2_adds_the_reference_on_each_variants_text_after_that_variants_native_run() -> None:
    plan = _plan(extraction={"replay": "2x2"})
    extracts = {
        (p.variant, p.trait.name, p.mode, p.replay_from): p for p in _params(plan, JobKind.EXTRACT)
    }
    reverse = sorted(k for k in extracts if k[2] == "reverse")
    # pv/evil reads responses: one reverse job per non-reference variant; caa reads the prompt.
    assert reverse == [(REF, "pv/evil", "reverse", INT8), (REF, "pv/evil", "reverse", NF4)]
    for variant in (NF4, INT8):  # both the variant's own text and the reference's
        assert (variant, "pv/evil", "native", None) in extracts
        assert (variant, "pv/evil", "replay", REF) in extracts
    by_id = {j.id: j for j in plan.jobs}
    for job in plan.jobs:
        p = parse_job_params(job)
        if isinstance(p, ExtractParams) and p.mode == "reverse":
            (dep,) = job.deps
            native = parse_job_params(by_id[dep])
            assert isinstance(native, ExtractParams)
            assert (native.variant, native.mode) == (p.replay_from, "native")
    # Steering still uses the replay vectors; reverse vectors are never steered with.
    own = [p for p in _params(plan, JobKind.STEER) if p.trait.name == "pv/evil" and p.target != REF]
    assert {p.vector_mode for p in own if p.source == p.target} == {"replay"}
    check_result_keys(parse_spec(_spec(extraction={"replay": "2x2"})), plan.jobs)


def test_cross_precision_both_steers_the_reference_with_each_variants_vectors() -> None:
    one = _params(_plan(steering={"cross_precision": True}), JobKind.STEER)
    both = _params(_plan(steering={"cross_precision": "both"}), JobKind.STEER)
    pairs = lambda ps: {(p.target, p.source, p.trait.name) for p in ps}  # noqa: E731
    added = pairs(both) - pairs(one)
    assert added == {(REF, v, t) for v in (NF4, INT8) for t in ("pv/evil", "caa/sycophancy")}
    assert pairs(one) <= pairs(both)
    crossed = [
        p for p in both if isinstance(p, SteerParams) and p.source == NF4 and p.target == REF
    ]
    assert {p.vector_mode for p in crossed} == {"replay", "native"}  # nf4's primary per trait


def test_logit_diff_runs_with_the_other_variants_vectors_one_or_both_ways() -> None:
    def pairs(**ld: Any) -> set[tuple[str, str]]:
        ps = _params(_plan(logit_diff=ld), JobKind.LOGIT_DIFF)
        assert all(isinstance(p, LogitDiffParams) and p.trait.name == "caa/sycophancy" for p in ps)
        return {(p.variant, p.source) for p in ps}

    native = {(v, v) for v in (REF, NF4, INT8)}
    assert pairs() == native
    assert pairs(cross_precision=True) == native | {(NF4, REF), (INT8, REF)}
    assert pairs(cross_precision="both") == native | {
        (NF4, REF),
        (INT8, REF),
        (REF, NF4),
        (REF, INT8),
    }


def test_nothing_is_added_when_off() -> None:
    """The defaults plan exactly the jobs (ids included) of a spec that never names them."""
    plain = _plan()
    explicit = _plan(extraction={"replay": "on"}, logit_diff={"cross_precision": False})
    assert [j.id for j in plain.jobs] == [j.id for j in explicit.jobs]
    modes = {p.mode for p in _params(plain, JobKind.EXTRACT)}
    assert modes == {"native", "replay"}
    assert (
        "cross_precision" not in ExperimentSpec.model_validate(_spec()).model_dump()["logit_diff"]
    )


@pytest.mark.parametrize(
    ("sections", "field", "words"),
    [
        (
            {"precisions": ["fp32"], "extraction": {"replay": "2x2"}},
            "extraction.replay",
            "precision",
        ),
        (
            {"traits": ["caa/sycophancy"], "extraction": {"replay": "2x2"}},
            "extraction.replay",
            "response",
        ),
        (
            {"precisions": ["fp32"], "steering": {"cross_precision": "both"}},
            "steering.cross_precision",
            "precision",
        ),
        (
            {"steering": {"enabled": False, "cross_precision": "both"}},
            "steering.cross_precision",
            "enabled",
        ),
        (
            {"logit_diff": {"enabled": False, "cross_precision": True}},
            "logit_diff.cross_precision",
            "enabled",
        ),
        (
            {"traits": ["pv/evil"], "logit_diff": {"cross_precision": "both"}},
            "logit_diff.cross_precision",
            "caa",
        ),
        ({"logit_diff": {"cross_precision": "sideways"}}, "logit_diff.cross_precision", ""),
    ],
)
def test_impossible_requests_are_refused_by_name(
    sections: dict[str, Any], field: str, words: str
) -> None:
    spec = _spec()
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(InvalidArgument) as err:
        parse_spec(spec)
    assert err.value.field.startswith(field), err.value
    assert words in err.value.message


def test_a_reverse_extraction_job_must_name_the_text_it_reads() -> None:
    plan = _plan(extraction={"replay": "2x2"})
    job = next(j for j in plan.jobs if j.kind is JobKind.EXTRACT and j.params["mode"] == "reverse")
    with pytest.raises(InvalidArgument) as err:
        parse_job_params(job.model_copy(update={"params": {**job.params, "replay_from": None}}))
    assert err.value.field == "params.replay_from" and "reverse" in err.value.message


def test_writers_and_readers_agree_on_every_new_jobs_key() -> None:
    """The extractor's and steerer's result keys, the analyzer's expected keys and the plan-time
    collision check's folders agree for every job the both-directions settings add."""
    from services.analyzer.run_keys import expected_key, parse_key, sort_keys
    from services.common.resultkeys import result_prefix
    from services.extractor.handler import HANDLERS as EXTRACT
    from services.steerer.handler import HANDLERS as STEER

    kinds = (JobKind.EXTRACT, JobKind.STEER, JobKind.LOGIT_DIFF)
    registry = {k: v for k, v in {**EXTRACT, **STEER}.items() if k in kinds}
    both = {"replay": "2x2"}, {"cross_precision": "both"}, {"cross_precision": "both"}
    plan = _plan(extraction=both[0], steering=both[1], logit_diff=both[2])
    keys: set[str] = set()
    for job in plan.jobs:
        entry = registry.get(job.kind)
        if entry is None or entry.result_key is None:
            continue
        key = entry.result_key(job.run_id, parse_job_params(job))
        expected = expected_key(job.run_id, job)
        assert expected is not None and expected[1] == key
        prefix = result_prefix(job)
        assert prefix is not None and key.startswith(prefix + "/")
        keys.add(key)
    assert len(keys) == len([j for j in plan.jobs if j.kind in registry])
    reverse = [k for k in keys if "/reverse/" in k]
    assert len(reverse) == 2
    found = sort_keys(sorted(keys), f"runs/{plan.run_id}/", {REF, NF4, INT8})
    assert sorted(r[3] for r in found.reverse) == [INT8, NF4]
    assert all(parse_key(f"runs/{plan.run_id}/", k) for k in reverse)
