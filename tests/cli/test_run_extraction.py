"""A full extraction through ``qsens run`` on a tiny model: real NATS, real S3, real loaders,
the judge service and an extractor worker, all as separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common import settings
from services.common.artefacts import extract_key
from services.common.store import S3Store
from services.common.tensor_codec import load_safetensors
from services.extractor.methods import VectorSet
from tests.conftest import PlaneEnv
from tests.loader_procs import REPO, LoaderProc, start_loader

SPEC = """
name: e2e
models:
  - {name: tiny, source: "tiny:llama", device: cpu}
precisions: [fp32, nf4]
reference: fp32
traits: [pv/evil, caa/sycophancy, arditi/refusal]
methods: [mean_diff, probe, pca]
extraction:
  n_train: 4
  n_val: 2
  max_new_tokens: 8
  vetting: {positive_min: 0, negative_max: 100, min_keep: 2}
steering: {enabled: false}
logit_diff: {enabled: false}
probes: {enabled: false}
analysis: {enabled: false}
"""


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def services_up(plane_env: PlaneEnv, tmp_path: Path) -> Iterator[dict[str, LoaderProc]]:
    loaders = {
        p: start_loader(
            "tiny:llama", p, extra_args=["--name", "tiny", "--announce"], http=False, metrics=False
        )
        for p in ("fp32", "nf4")
    }
    ready = tmp_path / "judge.json"
    judge = _spawn(
        "judge",
        "serve",
        "--backend",
        "embedding",
        "--loader-address",
        loaders["fp32"].address,
        "--ready-file",
        str(ready),
        log=tmp_path / "judge.log",
    )
    workers = [
        _spawn("worker", "run", service, log=tmp_path / f"worker-{service}.log")
        for service in ("extractor", "steerer", "analyzer")
    ]
    import time

    deadline = time.monotonic() + 120
    while not ready.exists():
        assert judge.poll() is None, (tmp_path / "judge.log").read_text()
        assert time.monotonic() < deadline, "judge service not ready"
        time.sleep(0.2)
    yield loaders
    for proc in (*workers, judge):
        proc.terminate()
        proc.wait(30)
    for loader in loaders.values():
        loader.stop()


def test_extraction_end_to_end(services_up: dict[str, LoaderProc], tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    planned = _cli("plan", str(spec), "--json")
    assert planned.returncode == 0, planned.stderr
    assert sum(j["kind"] == "extract" for j in json.loads(planned.stdout)["jobs"]) == 6

    done = _cli("run", str(spec), "--run-id", "e2e-test-run")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = "e2e-test-run"

    settings.reset()
    store = S3Store()
    for precision in ("fp32", "nf4"):
        for trait in ("pv/evil", "caa/sycophancy", "arditi/refusal"):
            mode = "replay" if (precision == "nf4" and trait.startswith("pv")) else "native"
            summary = json.loads(
                store.get_bytes(
                    extract_key(run_id, f"tiny@{precision}", trait, mode, "summary.json")
                )
            )
            assert summary["layers"] == [0, 1, 2, 3]
            assert summary["n_train_pos"] >= 2 and summary["n_train_neg"] >= 2
            assert set(summary["vector_keys"]) == {"mean_diff", "probe", "pca"}
            vs = VectorSet.from_safetensors(store.get_bytes(summary["vector_keys"]["mean_diff"]))
            assert vs.vectors.shape == (4, 64) and np.isfinite(vs.vectors).all()
            assert len(summary["activation_norm"]) == 4 and min(summary["activation_norm"]) > 0
            acts, meta = load_safetensors(store.get_bytes(summary["activations_key"]))
            assert acts["train_pos"].shape[1:] == (4, 64)
            assert json.loads(meta["layers"]) == [0, 1, 2, 3]

    # Vetting went through the judge service (embedding backend) and was recorded.
    vetting = json.loads(
        store.get_bytes(extract_key(run_id, "tiny@fp32", "pv/evil", "native", "vetting.json"))
    )
    assert vetting["enabled"] and vetting["judge_backend"] == "embedding" and vetting["rubric_hash"]
    rows = [
        json.loads(x)
        for x in store.get_bytes(
            extract_key(run_id, "tiny@fp32", "pv/evil", "native", "responses.jsonl")
        ).splitlines()
    ]
    assert all(
        r["judge"] is not None and r["judge"]["status"] in ("scored", "refusal", "unscorable")
        for r in rows
    )
    assert vetting["kept_pos"] + vetting["dropped_pos"] == sum(r["label"] == 1 for r in rows)

    # Replay feeds the reference responses byte for byte.
    replayed = [
        json.loads(x)
        for x in store.get_bytes(
            extract_key(run_id, "tiny@nf4", "pv/evil", "replay", "responses.jsonl")
        ).splitlines()
    ]
    assert [(r["key"], r["response"].encode()) for r in replayed] == [
        (r["key"], r["response"].encode()) for r in rows
    ]
    assert any(r["response"] for r in rows)

    results = _cli("results", run_id, "--json")
    assert results.returncode == 0, results.stderr
    data = json.loads(results.stdout)
    assert data["summary"]["status"] == "succeeded"
    cos = {(c["trait"], c["method"]): c["cosine"] for c in data["cosine_to_reference"]}
    assert ("pv/evil", "mean_diff") in cos and len(cos[("pv/evil", "mean_diff")]) == 4
    # nf4 on a tiny random model is close to fp32 but not identical.
    assert all(-1.0 <= c <= 1.0 for values in cos.values() for c in values)
    status = _cli("status", run_id, "--json")
    assert json.loads(status.stdout)["summary"]["counts"]["done"] == 6
    listed = json.loads(_cli("runs", "--json").stdout)
    assert [(r["run_id"], r["status"], r["jobs"], r["counts"]) for r in listed] == [
        (run_id, "succeeded", 6, {"done": 6})
    ]
    assert run_id in _cli("runs").stdout


FULL_SPEC = """
name: e2e-full
models:
  - {name: tiny, source: "tiny:llama", family: tiny, size_b: 0.0001, device: cpu}
precisions: [fp32, nf4]
reference: fp32
traits: [pv/evil, caa/sycophancy, arditi/refusal]
methods: [mean_diff, probe]
extraction:
  n_train: 4
  n_val: 2
  max_new_tokens: 8
  vetting: {positive_min: 0, negative_max: 100, min_keep: 2}
steering:
  traits: [pv/evil, arditi/refusal]
  n_layers: 2
  questions: 3
  max_new_tokens: 8
  cross_precision: true
  search: {steps: 2, fine_points: 1, budget: equal, budget_runs: 3}
logit_diff: {limit: 6}
benchmarks:
  - {name: mmlu_ab, limit: 6}
probes: {limit: 4, max_new_tokens: 8}
"""


def test_whole_study_end_to_end(services_up: dict[str, LoaderProc], tmp_path: Path) -> None:
    """Every job kind of a study on the tiny model, through ``qsens run``, then the report."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(FULL_SPEC)
    planned = json.loads(_cli("plan", str(spec), "--json").stdout)
    kinds = {j["kind"] for j in planned["jobs"]}
    assert kinds == {"extract", "steer", "logit_diff", "benchmark", "probe", "analyze"}
    run_id = "e2e-full-run"
    done = _cli("run", str(spec), "--run-id", run_id, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads(_cli("status", run_id, "--json").stdout)
    assert status["summary"]["counts"]["done"] == len(planned["jobs"])

    settings.reset()
    store = S3Store()
    keys = store.list_keys(f"runs/{run_id}/")
    steer_results = [k for k in keys if "/steer/" in k and k.endswith("/result.json")]
    assert len(steer_results) == sum(j["kind"] == "steer" for j in planned["jobs"])
    cross = [json.loads(store.get_bytes(k)) for k in steer_results]
    assert any(r["cross_precision"] for r in cross)  # nf4 steered with the fp32 vectors
    assert any(r["mode"] == "ablate" for r in cross)  # directional ablation for refusal
    for r in cross:
        assert r["budget"]["total_runs"] == len(r["runs"])
    for name in ("vector_comparison.json", "steering_comparison.json", "report.html"):
        assert f"runs/{run_id}/analysis/{name}" in keys, name

    # `qsens report` reuses the run's own analysis (same inputs) and downloads it.
    out = tmp_path / "report"
    report = _cli("report", run_id, "--out", str(out))
    assert report.returncode == 0, report.stderr
    html = (out / "report.html").read_text()
    assert "<img" in html and (out / "report.md").read_text().startswith("#")
    assert not any("/analysis/report-" in k for k in store.list_keys(f"runs/{run_id}/analysis/"))
