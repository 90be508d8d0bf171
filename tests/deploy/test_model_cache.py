"""Weights are fetched once per cluster, not on every loader start: with components/model-cache
every loader, checkpoint init container and the quantizer share one ReadWriteMany claim as
their cache (QSENS_CACHE_DIR and the image's HF_HOME), run with HF_HUB_OFFLINE=1 (no hub
access, so clusters without egress work), read model folders from S3, and need little
ephemeral storage; a Job stages reference weights into the cache and S3."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
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


def test_stage_job_script_puts_the_download_into_s3(
    renders: dict[str, list[dict[str, Any]]], s3_env: Any, tmp_path: Path
) -> None:
    """The stage Job's script, run through /bin/sh with the real `qsens` against a real S3
    server: the folder `hf download` reports goes to S3 under the Job's MODEL_NAME, and a loader
    fetches it back intact. `hf` is a stand-in here (no hub access in tests) that records its
    arguments and prints a local folder's path, as `hf download --quiet` prints the snapshot's."""
    from services.common.s3folders import fetch_model_folder
    from services.common.tensor_codec import save_safetensors

    docs = renders["example-study"]
    (job,) = [p for p in pods(docs) if p.labels["app.kubernetes.io/component"] == "models-stage"]
    (c,) = job.spec["containers"]
    env = container_env(docs, c)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    weights = save_safetensors({"w": np.arange(12, dtype=np.float32)}, {})
    (snapshot / "model.safetensors").write_bytes(weights)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "hf-calls"
    (bin_dir / "hf").write_text(
        f'#!/bin/sh\necho "$*" > {calls}\necho "Fetching 2 files" >&2\necho {snapshot}\n'
    )
    (bin_dir / "hf").chmod(0o755)
    run_env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "QSENS_HOME": str(tmp_path / "home"),
        "MODEL_ID": env["MODEL_ID"],
        "MODEL_NAME": env["MODEL_NAME"],
        **s3_env.env,
    }
    out = subprocess.run(
        [*c["command"], *c["args"]], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert calls.read_text().split() == [
        "download",
        env["MODEL_ID"],
        "--exclude",
        "original/*",
        "--quiet",
    ]
    uri = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"s3://[^/]+/models/{re.escape(env['MODEL_NAME'])}-[0-9a-f]{{16}}/", uri)
    folder, notes = fetch_model_folder(uri, tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == weights
    assert "sha256 of every file checked" in notes[0]
    # A failed download (no token for a gated model, no egress) fails the Job before any upload.
    (bin_dir / "hf").write_text(f"#!/bin/sh\necho 401 Unauthorized >&2\necho {snapshot}\nexit 1\n")
    out = subprocess.run(
        [*c["command"], *c["args"]], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "s3://" not in out.stdout
