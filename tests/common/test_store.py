"""The S3 store against a real SeaweedFS server: write-once objects, safe keys, formats."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.store import AsyncS3Store, S3Store, check_key, run_key
from tests.conftest import PlaneEnv


def test_run_key_builds_and_refuses_unsafe_parts() -> None:
    assert run_key("r1", "smollm2-135m@nf4", "vectors", "pv", "evil.safetensors") == (
        "runs/r1/smollm2-135m@nf4/vectors/pv/evil.safetensors"
    )
    for bad in ["..", ".", "", "a/b", "a\\b", "x\ny"]:
        with pytest.raises(InvalidArgument):
            run_key("r1", "ok", bad)
    with pytest.raises(InvalidArgument):
        run_key("../r1", "ok")
    with pytest.raises(InvalidArgument):
        run_key("r1")
    with pytest.raises(InvalidArgument):
        check_key("runs/r1/../r2/x")


def test_put_bytes_writes_once_and_never_overwrites(s3_env: PlaneEnv, run_id: str) -> None:
    store = S3Store()
    key = run_key(run_id, "a", "blob.bin")
    assert not store.exists(key)
    assert store.put_bytes(key, b"first") is True
    assert store.put_bytes(key, b"second") is False
    assert store.get_bytes(key) == b"first"
    assert store.exists(key)


def test_runs_never_mix(s3_env: PlaneEnv, run_id: str) -> None:
    store = S3Store()
    other = run_id + "-other"
    store.put_json(run_key(run_id, "results.json"), {"run": run_id})
    store.put_json(run_key(other, "results.json"), {"run": other})
    assert store.list_keys(f"runs/{run_id}/") == [run_key(run_id, "results.json")]
    assert store.get_json(run_key(other, "results.json")) == {"run": other}


def test_json_jsonl_and_safetensors_round_trip(s3_env: PlaneEnv, run_id: str) -> None:
    store = S3Store()
    rows = [{"i": i, "text": f"réponse {i}"} for i in range(3)]
    assert store.put_jsonl(run_key(run_id, "responses.jsonl"), rows)
    assert store.get_jsonl(run_key(run_id, "responses.jsonl")) == rows
    vectors = {"layer.3": np.arange(12, dtype=np.float32).reshape(3, 4)}
    assert store.put_safetensors(run_key(run_id, "v.safetensors"), vectors, {"auroc": [0.9]})
    tensors, meta = store.get_safetensors(run_key(run_id, "v.safetensors"))
    np.testing.assert_array_equal(tensors["layer.3"], vectors["layer.3"])
    assert meta == {"auroc": "[0.9]"}


def test_missing_object_is_not_found(s3_env: PlaneEnv, run_id: str) -> None:
    with pytest.raises(NotFound, match=r"missing\.json"):
        S3Store().get_bytes(run_key(run_id, "missing.json"))


async def test_async_store_is_the_same_store(s3_env: PlaneEnv, run_id: str) -> None:
    store = AsyncS3Store()
    key = run_key(run_id, "async.json")
    assert await store.put_json(key, {"a": 1})
    assert not await store.put_json(key, {"a": 2})
    assert await store.get_json(key) == {"a": 1}
    assert await store.list_keys(f"runs/{run_id}/") == [key]
