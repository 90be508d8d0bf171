"""Weights are fetched once per cluster, not on every loader start: with components/model-cache
every loader, checkpoint init container and the quantizer share one ReadWriteMany claim as
their cache (QSENS_CACHE_DIR and the image's HF_HOME), run with HF_HUB_OFFLINE=1 (no hub
access, so clusters without egress work), read model folders from S3, and need little
ephemeral storage; a Job stages reference weights into the cache and S3."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    DOCKER,
    K8S,
    container_env,
    find,
    of_kind,
    pods,
    qsens_invocations,
)

CACHED = ("example-study", "example-study-submit", "example-study-plain")
GPU_PODS = ("loader", "quantizer")


def _image_env(dockerfile: str, name: str) -> str:
    """A variable the image's final stage sets (ENV)."""
    final = (DOCKER / dockerfile).read_text().rsplit("\nFROM ", 1)[1]
    match = re.search(rf"\b{name}=(\S+)", final)
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("target", CACHED)
def test_gpu_pods_share_one_cache_claim(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = renders[target]
    claim = find(docs, "PersistentVolumeClaim", "qsens-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    hf_home = _image_env("Dockerfile.loader", "HF_HOME")
    seen = set()
    for pod in pods(docs):
        component = pod.labels["app.kubernetes.io/component"]
        if component not in GPU_PODS:
            continue
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        for c in pod.containers():
            env = container_env(docs, c)
            cache = env["QSENS_CACHE_DIR"]
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == cache]
            volume = volumes[mount["name"]]
            assert volume == {
                "name": mount["name"],
                "persistentVolumeClaim": {"claimName": "qsens-model-cache"},
            }, (pod.name, c["name"])
            # The hub cache is inside it, so a staged hub snapshot is found offline.
            assert hf_home.startswith(cache + "/")
            # Model folders and checkpoints come from S3.
            assert "QSENS_S3_SECRET_KEY" in env, (pod.name, c["name"])
        (main,) = pod.spec["containers"]
        assert container_env(docs, main)["HF_HUB_OFFLINE"] == "1", pod.name
        seen.add(component)
    assert seen == set(GPU_PODS)


@pytest.mark.parametrize("target", CACHED)
def test_three_loaders_fit_a_node(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    """No loader asks for tens of GB of ephemeral storage any more (weights live in the claim):
    three of them fit the ephemeral storage of a common GPU node (100 GB of disk)."""
    for pod in pods(renders[target]):
        if pod.labels["app.kubernetes.io/component"] != "loader":
            continue
        total = 0.0
        for c in pod.containers():
            request = c["resources"]["requests"].get("ephemeral-storage", "0Gi")
            total += float(request.removesuffix("Gi"))
        empty = [
            v
            for v in pod.spec["volumes"]
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        ]
        total_dirs = sum(float(v["emptyDir"]["sizeLimit"].removesuffix("Gi")) for v in empty)
        assert 3 * max(total, total_dirs) <= 100, (pod.name, total, total_dirs)


def test_without_the_component_nothing_changes(renders: dict[str, list[dict[str, Any]]]) -> None:
    """local-kind (tiny models, no weights to cache) keeps its emptyDir and has no claim."""
    docs = renders["local-kind"]
    assert not of_kind(docs, "PersistentVolumeClaim")
    for pod in pods(docs):
        if pod.labels["app.kubernetes.io/component"] == "loader":
            cache = next(v for v in pod.spec["volumes"] if v["name"] == "cache")
            assert "emptyDir" in cache


def test_stage_job_puts_the_studys_model_into_cache_and_s3(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["example-study"]
    (job,) = [p for p in pods(docs) if p.labels["app.kubernetes.io/component"] == "models-stage"]
    (c,) = job.spec["containers"]
    env = container_env(docs, c)
    # The model it stages is the one the study and its loaders name.
    spec = yaml.safe_load((K8S / "overlays/example-study-submit/study.yaml").read_text())
    assert env["MODEL_ID"] in {m["source"] for m in spec["models"]}
    script = c["args"][0]
    assert 'hf download "$MODEL_ID"' in script and "set -e" in script
    (put,) = qsens_invocations(c, env)
    assert put[:2] == ["models", "put"] and put[put.index("--name") + 1] == env["MODEL_NAME"]
    # Into the same claim the loaders read, with S3 credentials, and not offline (it downloads).
    cache = next(v for v in job.spec["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == "qsens-model-cache"
    assert "QSENS_S3_SECRET_KEY" in env and "HF_HUB_OFFLINE" not in env
