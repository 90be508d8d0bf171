"""Data on S3 for a cluster, against the real SeaweedFS: ``qsens data put``, ``s3://`` locations
read by the trait and benchmark readers through the content-addressed cache, and the cluster
check of ``qsens plan``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.common import settings
from services.common.datafiles import DIGEST_CHARS, local_copy, parse_s3, put_data
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.spec import BenchmarkSpec
from services.common.store import S3Store
from services.extractor.datasets import load_trait, published_dir
from services.steerer.benchmarks import read_benchmark
from tests.conftest import PlaneEnv

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(s3_env: PlaneEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """S3 of the session and a data cache of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("QSENS_CACHE_DIR", str(root))
    settings.reset()
    return root / "data"


def _unique_json(path: Path) -> bytes:
    """A small JSON file whose content (and so its key) no other test shares."""
    path.write_text(json.dumps({"nonce": uuid.uuid4().hex}))
    return path.read_bytes()


def test_put_a_file_then_read_it_back_through_the_cache(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _unique_json(tmp_path / "own.json")
    digest = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]  # what `sha256sum` shows
    uri = put_data(tmp_path / "own.json")
    assert uri == f"s3://qsens-test/data/{digest}/own.json"
    assert put_data(tmp_path / "own.json") == uri  # same content, same key: harmless
    assert S3Store().get_bytes(f"data/{digest}/own.json") == data

    local = local_copy(uri)
    assert local == cache / digest / "own.json" and local.read_bytes() == data
    # A key that carries its digest is served from the cache without asking S3 at all.
    monkeypatch.setenv("QSENS_S3_ENDPOINT", "127.0.0.1:9")
    settings.reset()
    assert local_copy(uri) == local


def test_folder_trait_on_s3_reads_like_the_local_folder(cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sycophancy"
    shutil.copytree(published_dir() / "caa" / "sycophancy", folder)
    (folder / "note.txt").write_text(uuid.uuid4().hex)  # unique content, unique key
    uri = put_data(folder)
    bucket, key = parse_s3(uri)
    assert bucket == "qsens-test" and key.endswith("/sycophancy")
    assert S3Store().list_keys(key + "/") == [
        f"{key}/{name}" for name in ("generate.json", "note.txt", "test_ab.json")
    ]
    remote, local = load_trait(f"caa:{uri}"), load_trait(f"caa:{folder}")
    assert remote.name == local.name == "caa/sycophancy"
    assert (remote.ab_train, remote.ab_test) == (local.ab_train, local.ab_test)
    assert len(remote.ab_train) == 310
    assert remote.source.startswith(f"caa:{uri} sha256:")
    # One file of the uploaded folder, addressed on its own.
    single = load_trait(f"caa:{uri}/test_ab.json")
    assert single.ab_train == local.ab_test


def test_benchmark_path_on_s3(cache: Path) -> None:
    shipped = published_dir() / "caa" / "truthfulqa_ab.json"
    uri = put_data(shipped)
    items, digest = read_benchmark(BenchmarkSpec(name="tqa", format="caa_ab", path=uri))
    assert len(items) == 307 and digest == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert items == read_benchmark(BenchmarkSpec.model_validate("truthfulqa_ab"))[0]


def test_bad_locations_are_named(cache: Path, tmp_path: Path) -> None:
    store = S3Store()
    with pytest.raises(InvalidArgument) as err:
        load_trait("pv:s3://qsens-test/data/0000000000000000/missing.json")
    assert err.value.field == "trait" and "no such object or folder" in err.value.message
    with pytest.raises(InvalidArgument, match="names no key"):
        local_copy("s3://qsens-test/")
    with pytest.raises(InvalidArgument, match="bad bucket name"):
        local_copy("s3://Bad_Bucket/x.json")
    # An object at a content-addressed key whose bytes do not match it (written by hand).
    fake = f"data/{uuid.uuid4().hex[:DIGEST_CHARS]}/x.json"
    store.put_bytes(fake, b"[]")
    with pytest.raises(InvalidArgument, match=r"not the \w+ its key names"):
        local_copy(f"s3://qsens-test/{fake}")
    # A chosen key is written once: the same bytes again are fine, other bytes are refused.
    key = f"mine/{uuid.uuid4().hex}.json"
    _unique_json(tmp_path / "a.json")
    assert put_data(tmp_path / "a.json", key=key) == f"s3://qsens-test/{key}"
    assert put_data(tmp_path / "a.json", key=key) == f"s3://qsens-test/{key}"
    _unique_json(tmp_path / "a.json")
    with pytest.raises(FailedPrecondition, match="already holds other content"):
        put_data(tmp_path / "a.json", key=key)
    with pytest.raises(InvalidArgument, match="not a readable file or folder"):
        put_data(tmp_path / "absent.json")


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_data_put_cli_and_the_cluster_check_of_plan(cache: Path, tmp_path: Path) -> None:
    own = tmp_path / "refusal"
    shutil.copytree(published_dir() / "caa" / "refusal", own)
    (own / "extras.json").write_text(json.dumps({"source": f"test {uuid.uuid4().hex}"}))
    put = _cli("data", "put", str(own))
    assert put.returncode == 0, put.stderr
    uri = put.stdout.strip()
    assert uri.startswith("s3://qsens-test/data/") and uri.endswith("/refusal")

    spec = tmp_path / "spec.yaml"
    body = (
        "name: t\nmodels: [{name: m, source: 'tiny:llama'}]\nprecisions: [bf16]\n"
        "steering: {enabled: false}\nbenchmarks: [mmlu_ab]\ntraits: [pv/evil, 'caa:%s']\n"
    )
    spec.write_text(body % own)
    local = _cli("plan", str(spec), "--json")  # S3 on loopback: a laptop, local paths are fine
    assert local.returncode == 0, local.stderr
    assert {j["kind"] for j in json.loads(local.stdout)["jobs"]} >= {"extract", "benchmark"}
    refused = _cli("plan", str(spec), "--cluster")
    assert refused.returncode == 2
    said = " ".join(refused.stderr.split())  # rich wraps the line
    assert f"traits[1].ref: {own} is a local path" in said
    assert (
        "on a cluster the path must be an s3:// key; upload it with `qsens data put FILE`" in said
    )
    spec.write_text(body % uri)
    portable = _cli("plan", str(spec), "--cluster", "--json")
    assert portable.returncode == 0, portable.stderr
    refs = {
        j["params"]["trait"]["ref"]
        for j in json.loads(portable.stdout)["jobs"]
        if j["kind"] == "extract"
    }
    assert refs == {"pv/evil", f"caa:{uri}"}
