"""Each overlay's study spec is valid and served: one loader per variant it plans, loading the
model source the spec names, and a judge configured as the spec expects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.jobs import validate_run_id
from services.common.planner import quantize_request, variants_of
from services.common.spec import check_portable, load_spec
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    container_env,
    expand_args,
    find,
    pods,
    qsens_invocations,
)

# overlay rendered -> the study spec it serves
STUDIES = {
    "example-study": K8S / "overlays" / "example-study-submit" / "study.yaml",
    "local-kind": K8S / "overlays" / "local-kind" / "study.yaml",
}


def deploy_studies(deploy: Path = DEPLOY) -> list[Path]:
    """Every experiment spec under ``deploy`` (a YAML mapping with models and traits)."""
    found = []
    for path in sorted(deploy.rglob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue  # not plain YAML (a template): no spec
        if len(docs) == 1 and isinstance(docs[0], dict) and {"models", "traits"} <= set(docs[0]):
            found.append(path)
    return found


def test_every_deploy_study_is_served() -> None:
    # So each one is checked below, and planned for a cluster by tests/cli/test_fresh_clone.
    assert deploy_studies() == sorted(STUDIES.values())


def _loader_variants(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """variant id -> what its loader runs (from the expanded command line)."""
    out: dict[str, dict[str, str]] = {}
    for pod in pods(docs):
        if pod.labels.get("app.kubernetes.io/component") != "loader":
            continue
        (c,) = pod.spec["containers"]
        args = expand_args(c, container_env(docs, c))
        opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        variant = f"{opts['--name']}@{opts['--precision']}"
        assert variant not in out, f"two loaders for {variant}"
        # The labels Prometheus and the budgets use say the same.
        assert pod.labels["qsens.io/model"] == opts["--name"]
        assert pod.labels["qsens.io/precision"] == opts["--precision"]
        assert pod.owner["spec"].get("replicas", 1) >= 1
        out[variant] = opts
    return out


@pytest.mark.parametrize("target", sorted(STUDIES))
def test_every_planned_variant_has_a_loader(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    spec = load_spec(STUDIES[target])
    loaders = _loader_variants(renders[target])
    planned = {v.id: v for v in variants_of(spec)}
    assert set(loaders) == set(planned)
    for variant_id, v in planned.items():
        assert loaders[variant_id]["--model"] == v.model.source, variant_id
        assert loaders[variant_id]["--device"] == v.model.device, variant_id
        # A variant the platform quantizes: its loader waits for exactly the checkpoint the
        # planned quantize job makes (same request, so the same content address).
        request = quantize_request(spec, v.model, v.precision)
        if request is None:
            assert "--quantize" not in loaders[variant_id], variant_id
        else:
            given = json.loads(loaders[variant_id]["--quantize"])
            assert given == request.model_dump(mode="json"), variant_id


@pytest.mark.parametrize("target", sorted(STUDIES))
def test_judge_matches_the_spec(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    spec = load_spec(STUDIES[target])
    docs = renders[target]
    judge = find(docs, "Deployment", "qsens-judge")
    env = container_env(docs, judge["spec"]["template"]["spec"]["containers"][0])
    assert env["QSENS_JUDGE_BACKEND"] == spec.judge.backend
    if spec.judge.backend == "openai":
        assert env["QSENS_JUDGE_MODEL"] == spec.judge.model
        assert "QSENS_JUDGE_API_KEY_FILE" in env


@pytest.mark.parametrize("target", sorted(STUDIES))
def test_studies_read_no_local_files(target: str) -> None:
    """Loaders and workers in the cluster cannot read files from the submitting machine."""
    check_portable(load_spec(STUDIES[target]))


def test_submit_job_submits_the_study(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The Job runs the study and waits for it (no --detach), then exports that run's report."""
    docs = renders["example-study-submit"]
    job = next(p for p in pods(docs) if p.labels.get("app.kubernetes.io/component") == "submit")
    (c,) = job.spec["containers"]
    run, report = qsens_invocations(c, container_env(docs, c))
    assert run[0] == "run" and "--detach" not in run
    run_id = run[run.index("--run-id") + 1]
    validate_run_id(run_id)
    assert report[:2] == ["report", run_id]
    args = run
    # The spec file it names is the generated ConfigMap's study.yaml, mounted there.
    mount = next(m for m in c["volumeMounts"] if args[1].startswith(m["mountPath"] + "/"))
    volume = next(v for v in job.spec["volumes"] if v["name"] == mount["name"])
    spec_map = find(docs, "ConfigMap", volume["configMap"]["name"])
    filename = args[1].rsplit("/", 1)[1]
    assert spec_map["data"][filename] == STUDIES["example-study"].read_text()
