"""`qsens vectors import | export | compare` as a user runs them, against the real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from services.common.artefacts import extract_key
from services.common.contracts.vectors import VectorSet
from services.common.store import S3Store
from services.common.vector_formats import read_vectors, write_vectors
from services.extractor.methods import mean_diff
from tests.conftest import PlaneEnv

REPO = Path(__file__).resolve().parents[2]


def _qsens(*args: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "QSENS_HOME": str(home / "state"), "COLUMNS": "200"}
    full["QSENS_CACHE_DIR"] = str(home / "cache")
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "vectors", *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _extracted() -> VectorSet:
    rng = np.random.default_rng(11)
    pos = rng.normal(size=(10, 3, 32)).astype(np.float32) + 0.3
    neg = rng.normal(size=(10, 3, 32)).astype(np.float32)
    return mean_diff(pos, neg, layers=[4, 5, 6], meta={"model": "tiny", "trait": "pv/evil"})


def test_import_put_export_and_compare_through_s3(
    s3_env: PlaneEnv, tmp_path: Path, run_id: str
) -> None:
    vs = _extracted()
    gguf = tmp_path / "evil.gguf"
    gguf.write_bytes(write_vectors(vs, "repeng-gguf", model_hint="LlamaForCausalLM"))
    local = tmp_path / "evil.qsens.safetensors"
    done = _qsens(
        "import", str(gguf), "--out", str(local), "--put", "--trait", "pv/evil",
        env=s3_env.env, home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out_path, uri = done.stdout.split()
    assert out_path == str(local) and uri.startswith("s3://") and uri.endswith(".safetensors")
    stored = VectorSet.from_safetensors(local.read_bytes())
    assert stored.layers == (4, 5, 6) and stored.meta["trait"] == "pv/evil"
    assert stored.meta["imported"]["model_hint"] == "LlamaForCausalLM"
    np.testing.assert_array_equal(stored.vectors, vs.vectors)
    # Out again from S3, as persona-vectors' .pt, and compared with the original.
    pt = tmp_path / "evil.pt"
    done = _qsens("export", uri, "--out", str(pt), env=s3_env.env, home=tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_vectors(pt.read_bytes(), "pv-pt").vectors, vs.vectors)
    done = _qsens("compare", str(gguf), str(pt), "--json", env=s3_env.env, home=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["layer"] for r in rows] == [4, 5, 6]
    assert all(abs(r["cosine"] - 1.0) < 1e-6 and abs(r["norm_ratio"] - 1) < 1e-6 for r in rows)
    # An extraction of a run is addressed as run:<run>/<variant>/<trait>/<method>.
    key = extract_key(run_id, "tiny@fp32", "pv/evil", "native", "vectors", "mean_diff.safetensors")
    S3Store().put_bytes(key, vs.to_safetensors())
    plain = tmp_path / "evil.safetensors"
    ref = f"run:{run_id}/tiny@fp32/pv/evil/mean_diff"
    done = _qsens("export", ref, "--out", str(plain), env=s3_env.env, home=tmp_path)
    assert done.returncode == 0, done.stderr
    back = read_vectors(plain.read_bytes(), "safetensors")
    assert back.method == "mean_diff" and back.layers == (4, 5, 6)
    np.testing.assert_array_equal(back.vectors, vs.vectors)


def test_bad_inputs_exit_2_with_a_named_field(s3_env: PlaneEnv, tmp_path: Path) -> None:
    odd = tmp_path / "v.npy"
    odd.write_bytes(b"\x93NUMPY")
    done = _qsens("import", str(odd), "--out", str(tmp_path / "o"), env=s3_env.env, home=tmp_path)
    assert done.returncode == 2 and "format" in done.stderr
    done = _qsens("import", str(tmp_path / "missing.gguf"), "--put", env=s3_env.env, home=tmp_path)
    assert done.returncode == 2 and "source" in done.stderr
    done = _qsens(
        "export", "run:r/only-three/parts", "--out", "x.pt", env=s3_env.env, home=tmp_path
    )
    assert done.returncode == 2 and "expected run:" in done.stderr
