"""The stage contracts: the planner's jobs are the typed params, byte for byte as before.

``golden_plan_ids.json`` holds the job ids (hashes of kind, run, params and deps) that the
planner gave three specs before the params became typed models: equal ids mean equal params
on the wire, so plans stored by earlier versions stay valid.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.contracts.kinds import PARAMS, parse_job_params
from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobKind
from services.common.planner import build_plan
from services.common.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((Path(__file__).with_name("golden_plan_ids.json")).read_text())


def _specs() -> dict[str, dict[str, Any]]:
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    wide = copy.deepcopy(demo)
    wide["extraction"]["replay"] = "both"
    wide["steering"].update(cross_precision=True, ablation=True, directions=["+", "-"])
    wide["name"] = "wide"
    narrow = copy.deepcopy(demo)
    narrow.update(
        name="narrow",
        precisions=["bf16", "int8"],
        analysis={"enabled": False},
        traits=[{"ref": "pv/evil", "position": "prompt[-1]"}, "caa/sycophancy"],
        layers=[1, 3],
    )
    narrow["extraction"]["replay"] = "off"
    narrow["steering"]["methods"] = ["probe", "mean_diff"]
    return {"demo": demo, "wide": wide, "narrow": narrow}


@pytest.mark.parametrize("name", ["demo", "wide", "narrow"])
def test_plans_keep_their_job_ids(name: str) -> None:
    plan = build_plan(parse_spec(_specs()[name]), f"golden-{name}")
    assert {job.name: job.id for job in plan.jobs} == GOLDEN[name]


@pytest.mark.parametrize("name", ["demo", "wide"])
def test_every_planned_job_validates_against_its_contract(name: str) -> None:
    plan = build_plan(parse_spec(_specs()[name]), f"golden-{name}")
    kinds = set()
    for job in plan.jobs:
        params = parse_job_params(job)
        kinds.add(job.kind)
        # The typed form is the wire form: dumping it gives back the job's params exactly.
        assert params.model_dump(mode="json") == job.params, job.label
    assert kinds == set(JobKind) - {JobKind.NOOP}


def test_a_malformed_job_names_the_bad_field() -> None:
    plan = build_plan(parse_spec(_specs()["demo"]), "golden-demo")
    steer = next(j for j in plan.jobs if j.kind is JobKind.STEER)
    bad = Job(
        kind=JobKind.STEER,
        run_id=steer.run_id,
        params={**steer.params, "steering": {**steer.params["steering"], "n_layers": "many"}},
    )
    with pytest.raises(InvalidArgument) as err:
        parse_job_params(bad)
    assert err.value.field == "params.steering.n_layers"
    extract = next(j for j in plan.jobs if j.kind is JobKind.EXTRACT)
    with pytest.raises(InvalidArgument, match=r"params\.trait\.methodology"):
        parse_job_params(
            Job(
                kind=JobKind.EXTRACT,
                run_id=extract.run_id,
                params={**extract.params, "trait": {**extract.params["trait"], "methodology": "x"}},
            )
        )


def test_every_kind_but_noop_has_a_params_contract() -> None:
    assert set(PARAMS) == set(JobKind) - {JobKind.NOOP}


def test_layer_cosines_are_float64_clipped_and_explain_undefined_layers() -> None:
    import numpy as np

    from services.common.contracts.vectors import layer_cosines
    from tests.analyzer.planted import L, vector_set

    rng = np.random.default_rng(7)
    ref = rng.normal(size=(L, 16))
    var = ref + 0.3 * rng.normal(size=(L, 16))
    var[1] = 0.0  # zero-norm variant layer: no cosine, with the reason
    var[2] = -3.0 * ref[2]  # opposite: -1 up to rounding, never below (clipped)
    mine = layer_cosines(vector_set(ref, "mean_diff"), vector_set(var, "mean_diff"))
    assert [c.layer for c in mine] == list(range(L))
    assert mine[1].cosine is None and mine[1].reasons == ("zero-norm variant vector",)
    assert mine[2].cosine is not None and -1.0 <= mine[2].cosine < -0.999999
    a32, b32 = ref.astype(np.float32).astype(np.float64), var.astype(np.float32).astype(np.float64)
    for c in mine:
        if c.layer in (1, 2):
            continue
        i = c.layer
        want = a32[i] @ b32[i] / (np.linalg.norm(a32[i]) * np.linalg.norm(b32[i]))
        assert c.cosine == pytest.approx(float(want), abs=1e-12) and c.reasons == ()


def test_every_planned_job_has_its_own_result_key() -> None:
    from services.extractor.handler import HANDLERS as EXTRACT
    from services.quantizer.handler import HANDLERS as QUANTIZE
    from services.steerer.handler import HANDLERS as STEER

    registry = {**EXTRACT, **STEER, **QUANTIZE}
    plan = build_plan(parse_spec(_specs()["wide"]), "golden-wide")
    keys: dict[str, str] = {}
    for job in plan.jobs:
        entry = registry.get(job.kind)
        if entry is None:
            assert job.kind is JobKind.ANALYZE
            continue
        assert entry.result_key is not None
        key = entry.result_key(job.run_id, parse_job_params(job))
        assert key.startswith(f"runs/{job.run_id}/") and key.endswith(".json"), key
        assert key not in keys, f"{job.label} and {keys[key]} would share {key}"
        keys[key] = job.label
    assert len(keys) == len(plan.jobs) - 1
