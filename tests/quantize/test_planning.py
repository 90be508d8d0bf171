"""Planning gptq/awq variants: quantize jobs before their loaders' jobs, published checkpoints,
the local stack's children, and preflight refusing a precision whose package is missing."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.errors import InvalidArgument
from services.common.jobs import JobKind
from services.common.planner import build_plan, check_precisions, quantize_request
from services.common.spec import parse_spec
from services.loader.backends import registry

SPEC: dict[str, Any] = {
    "name": "quant",
    "models": [{"name": "m", "source": "tiny:llama?hidden=128&intermediate=256"}],
    "precisions": ["bf16", "nf4", "int8", "gptq", "awq"],
    "traits": ["caa/sycophancy"],
    "quantize": {
        "gptq": {"bits": 4, "group_size": 64},
        "awq": {"group_size": 64},
        "calibration": {"samples": 16, "seq_len": 128},
    },
}


def test_quantize_jobs_come_before_every_job_of_their_variant() -> None:
    plan = build_plan(parse_spec(SPEC), "r1")
    quantize = {j.params["method"]: j for j in plan.jobs if j.kind is JobKind.QUANTIZE}
    assert set(quantize) == {"gptq", "awq"}
    assert quantize["gptq"].params["settings"]["group_size"] == 64
    assert quantize["awq"].params["calibration"] == {
        "source": "builtin",
        "samples": 16,
        "seq_len": 128,
    }
    for job in plan.jobs:
        variant = job.params.get("variant") or job.params.get("target")
        if variant in ("m@gptq", "m@awq") and job.kind in (
            JobKind.EXTRACT,
            JobKind.STEER,
            JobKind.BENCHMARK,
            JobKind.PROBE,
        ):
            assert quantize[variant.split("@")[1]].id in job.deps, job.name
        if variant in ("m@bf16", "m@nf4", "m@int8"):
            assert not {q.id for q in quantize.values()} & set(job.deps), job.name
    # Topological order: each quantize job precedes the jobs that need it.
    order = [j.id for j in plan.topological_order()]
    first_gptq = min(order.index(j.id) for j in plan.jobs if quantize["gptq"].id in j.deps)
    assert order.index(quantize["gptq"].id) < first_gptq


def test_published_checkpoint_plans_no_quantize_job(tmp_path: Path) -> None:
    spec = parse_spec(
        {**SPEC, "models": [{**SPEC["models"][0], "checkpoints": {"awq": str(tmp_path)}}]}
    )
    plan = build_plan(spec, "r1")
    methods = [j.params["method"] for j in plan.jobs if j.kind is JobKind.QUANTIZE]
    assert methods == ["gptq"]
    assert quantize_request(spec, spec.models[0], spec.precisions[4]) is None
    with pytest.raises(InvalidArgument, match="not a model folder") as err:
        check_precisions(spec)
    assert err.value.field == "models[0].checkpoints.awq"


def test_per_model_settings_override_the_spec() -> None:
    model = {**SPEC["models"][0], "quantize": {"gptq": {"bits": 8, "group_size": 32}}}
    spec = parse_spec({**SPEC, "models": [model]})
    request = quantize_request(spec, spec.models[0], spec.precisions[3])
    assert request is not None and request.settings["bits"] == 8
    assert request.settings["group_size"] == 32


def test_preflight_names_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(SPEC)
    check_precisions(spec)  # everything is installed here
    # Fault injection: pretend the backend needs a package this environment lacks.
    awq = dataclasses.replace(
        registry.BACKENDS["awq"], packages=("gptqmodel", "autoawq_not_installed")
    )
    monkeypatch.setitem(registry.BACKENDS, "awq", awq)
    with pytest.raises(InvalidArgument, match="autoawq_not_installed") as err:
        check_precisions(spec)
    assert err.value.field == "models[0].precisions"
    assert "m@awq" in err.value.message


def test_preflight_refuses_an_empty_calibration_file(tmp_path: Path) -> None:
    empty = tmp_path / "cal.txt"
    empty.write_text("\n")
    spec = parse_spec(
        {**SPEC, "quantize": {**SPEC["quantize"], "calibration": {"source": str(empty)}}}
    )
    with pytest.raises(InvalidArgument, match="is empty"):
        check_precisions(spec)


def test_stack_children_wait_for_checkpoints(tmp_path: Path) -> None:
    from services.cli.runs import children_for_spec

    path = tmp_path / "spec.yaml"
    published = tmp_path / "awq-ckpt"
    model = {**SPEC["models"][0], "checkpoints": {"awq": str(published)}}
    path.write_text(yaml.safe_dump({**SPEC, "models": [model]}))
    children = {c.name: c for c in children_for_spec(path, tmp_path / "home")}
    gptq = children["loader-m@gptq"]
    assert "--quantize" in gptq.argv and gptq.ready_file is None
    request = gptq.argv[gptq.argv.index("--quantize") + 1]
    assert '"method":"gptq"' in request.replace(" ", "")
    # What `qsens up` prints under it: the checkpoint and the job that makes it.
    assert re.search(
        r"waiting for checkpoint gptq-w4g\d+-\w+, made by the job 'quantize m@gptq'", gptq.note
    )
    assert children["loader-m@bf16"].note == ""
    awq = children["loader-m@awq"]
    assert "--quantize" not in awq.argv and awq.ready_file is not None
    assert awq.argv[awq.argv.index("--model") + 1] == str(published)
    assert children["loader-m@bf16"].ready_file is not None
    assert "worker-quantizer" in children
