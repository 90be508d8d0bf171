"""The quantize job: a real gptqmodel run on a tiny model, real S3, a real worker on real NATS.

Covers the content address (a second run reuses the checkpoint), what the result records
(calibration hash, size, tokens), atomic commit (a failed upload leaves no manifest), and the
named errors for bad input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobKind, RunPlan
from services.common.quantization import (
    CalibrationSpec,
    QuantizeSpec,
    checkpoint_id,
    manifest_key,
    parse_request,
)
from services.common.store import AsyncS3Store, S3Store
from services.quantizer.calibration import (
    BUILTIN_PATH,
    load_calibration,
    parse_calibration,
    tokenize_samples,
)
from services.quantizer.checkpoint import (
    commit_checkpoint,
    fetch_checkpoint,
    read_manifest,
    wait_for_checkpoint,
)
from services.quantizer.handler import handle, quantize_request
from tests.common.plane import open_plane, wait_status, worker

# Dims divisible by the group size; a model of its own so tests of other files do not share it.
TINY = "tiny:llama?layers=2&hidden=128&heads=4&kv_heads=2&intermediate=256&seed=3"
CALIBRATION = CalibrationSpec(samples=8, seq_len=64)


def tiny_request(method: str, **settings: Any) -> Any:
    spec = QuantizeSpec.model_validate(
        {
            "gptq": {"group_size": 64, **(settings if method == "gptq" else {})},
            "awq": {"group_size": 64, **(settings if method == "awq" else {})},
            "calibration": CALIBRATION.model_dump(),
        }
    )
    return spec.request("tiny-q", TINY, method)


def test_builtin_calibration_is_what_provenance_says() -> None:
    data = BUILTIN_PATH.read_bytes()
    cal = load_calibration(CalibrationSpec())
    assert cal.sha256 == hashlib.sha256(data).hexdigest() and cal.size_bytes == len(data)
    provenance = (BUILTIN_PATH.parent / "PROVENANCE.md").read_text()
    assert cal.sha256 in provenance
    assert len(cal.texts) >= 32 and all(len(t.split()) >= 40 for t in cal.texts)
    held_out = {
        json.loads(line)["text"]
        for line in (BUILTIN_PATH.parent / "heldout.jsonl").read_text().splitlines()
    }
    assert held_out and not held_out & set(cal.texts)


def test_calibration_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidArgument, match="is empty") as err:
        load_calibration(CalibrationSpec(source=str(empty)))
    assert err.value.field == "calibration.source"
    with pytest.raises(InvalidArgument, match="not 'builtin'"):
        load_calibration(CalibrationSpec(source=str(tmp_path / "missing.txt")))
    with pytest.raises(InvalidArgument, match="'text' string"):
        parse_calibration(b'{"txt": "x"}\n', "bad.jsonl")
    short = parse_calibration(b"one two\n\nthree four", "short.txt")

    class Words:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": list(range(len(text.split())))}

    with pytest.raises(InvalidArgument, match="too short") as err:
        tokenize_samples(short, Words(), samples=8, seq_len=64)
    assert err.value.field == "calibration"


def test_calibration_from_s3_as_data_put_prints_it(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``qsens data put`` prints s3://bucket/data/<digest>/name: that location reads (through
    the data cache), hashes like the local file, and a missing key or bucket is a named error."""
    import uuid

    from services.common import settings as settings_mod
    from services.common.datafiles import put_data

    monkeypatch.setenv("QSENS_CACHE_DIR", str(tmp_path / "cache"))
    settings_mod.reset()
    local = tmp_path / "mine.jsonl"
    rows = [{"text": f"passage {i} {uuid.uuid4().hex} " + "word " * 40} for i in range(6)]
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    uri = put_data(local)
    assert uri.startswith("s3://qsens-test/data/") and uri.endswith("/mine.jsonl")
    remote = load_calibration(CalibrationSpec(source=uri))
    assert remote.sha256 == load_calibration(CalibrationSpec(source=str(local))).sha256
    assert remote.texts == tuple(r["text"] for r in rows) and remote.name == uri
    # The store a quantize job passes serves the same bucket.
    assert load_calibration(CalibrationSpec(source=uri), S3Store()).sha256 == remote.sha256
    with pytest.raises(InvalidArgument, match="no such object") as err:
        load_calibration(CalibrationSpec(source="s3://qsens-test/data/0123/missing.jsonl"))
    assert err.value.field == "calibration.source"
    with pytest.raises(InvalidArgument, match="names no key after the bucket"):
        load_calibration(CalibrationSpec(source="s3://calibration.jsonl"))


def test_request_errors_are_named() -> None:
    with pytest.raises(InvalidArgument, match="unknown quantization method") as err:
        parse_request({"model": "m", "source": TINY, "method": "squeezellm"})
    assert err.value.field == "params.method"
    with pytest.raises(InvalidArgument, match="gptq supports 4 or 8 bits") as err:
        parse_request({"model": "m", "source": TINY, "method": "gptq", "settings": {"bits": 3}})
    assert err.value.field == "params.settings.bits"
    with pytest.raises(InvalidArgument, match="awq supports 4 bits"):
        parse_request({"model": "m", "source": TINY, "method": "awq", "settings": {"bits": 8}})


def test_address_covers_settings_and_calibration_not_the_name() -> None:
    a = tiny_request("gptq")
    assert checkpoint_id(a, "x") == checkpoint_id(a.model_copy(update={"model": "other"}), "x")
    assert checkpoint_id(a, "x") != checkpoint_id(a, "y")
    assert checkpoint_id(a, "x") != checkpoint_id(tiny_request("gptq", sym=False), "x")
    assert checkpoint_id(a, "x").startswith("gptq-w4g64-")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> dict[str, Any]:
    """GPTQ and AWQ checkpoints of the tiny model, quantized once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        mp.setenv("QSENS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        from services.common import settings as settings_mod

        settings_mod.reset()
        store = AsyncS3Store()
        out: dict[str, Any] = {"env": {**s3_server.env()}, "store": store.sync}
        for method in ("gptq", "awq"):
            out[method] = asyncio.run(quantize_request(tiny_request(method), store))
        out["again"] = asyncio.run(quantize_request(tiny_request("gptq"), store))
        settings_mod.reset()
    return out


def test_quantize_records_calibration_and_reuses(made: dict[str, Any]) -> None:
    first, again = made["gptq"], made["again"]
    cal = load_calibration(CALIBRATION)
    assert first["reused"] is False and again["reused"] is True
    assert first["checkpoint"] == again["checkpoint"]
    assert first["checkpoint"] == checkpoint_id(tiny_request("gptq"), cal.sha256)
    assert first["calibration"]["sha256"] == cal.sha256
    assert first["calibration"]["bytes"] == cal.size_bytes
    assert first["calibration"]["samples"] == 8
    assert 8 * 16 <= first["calibration"]["tokens"] <= 8 * 64
    assert first["quantize_seconds"] > 0 and first["size_bytes"] > 0
    assert again["job_seconds"] < first["job_seconds"]
    assert made["awq"]["checkpoint"].startswith("awq-w4g64-")
    manifest = read_manifest(made["store"], first["checkpoint"])
    assert manifest is not None
    names = {f.name for f in manifest.files}
    assert {"config.json", "model.safetensors", "qsens-quantize.json", "tokenizer.json"} <= names
    config = json.loads(
        made["store"].get_bytes(next(f.key for f in manifest.files if f.name == "config.json"))
    )
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["bits"] == 4


class _FailingStore:
    """Fault injection: the real store, but the n-th put raises (a crash mid-upload); with
    ``can_delete=False`` the cleanup fails too (a worker killed before it could clean up)."""

    def __init__(self, store: S3Store, fail_at: int, can_delete: bool = True) -> None:
        self.store, self.fail_at, self.puts, self.can_delete = store, fail_at, 0, can_delete
        self.bucket = store.bucket

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> bool:
        self.puts += 1
        if self.puts == self.fail_at:
            raise ConnectionError("S3 went away")
        return self.store.put_bytes(key, data)

    def get_bytes(self, key: str) -> bytes:
        return self.store.get_bytes(key)

    def list_keys(self, prefix: str) -> list[str]:
        return self.store.list_keys(prefix)

    def delete(self, keys: list[str]) -> int:
        if not self.can_delete:
            raise ConnectionError("S3 went away")
        return self.store.delete(keys)


def _parts(store: S3Store, checkpoint: str) -> list[str]:
    return store.list_keys(f"quantized/{checkpoint}/parts-")


def test_failed_upload_leaves_no_checkpoint_and_no_parts(
    made: dict[str, Any], tmp_path: Path
) -> None:
    store: S3Store = made["store"]
    manifest = read_manifest(store, made["gptq"]["checkpoint"])
    assert manifest is not None
    folder = fetch_checkpoint(store, manifest, tmp_path)
    request = tiny_request("gptq", damp_percent=0.07)
    fresh = checkpoint_id(request, "f" * 64)
    # A failed upload deletes the parts it wrote.
    with pytest.raises(ConnectionError):
        commit_checkpoint(_FailingStore(store, 3), fresh, folder, request, {})
    assert read_manifest(store, fresh) is None
    assert not store.exists(manifest_key(fresh))
    assert _parts(store, fresh) == []
    # One that could not clean up (killed) leaves orphans: two parts of one attempt.
    with pytest.raises(ConnectionError):
        commit_checkpoint(_FailingStore(store, 3, can_delete=False), fresh, folder, request, {})
    orphans = _parts(store, fresh)
    assert len(orphans) == 2 and len({k.split("/")[2] for k in orphans}) == 1
    # The attempt that commits deletes every part its manifest does not name.
    committed, won = commit_checkpoint(store, fresh, folder, request, {})
    assert won and read_manifest(store, fresh) == committed
    assert _parts(store, fresh) == sorted(f.key for f in committed.files)
    assert not set(orphans) & set(_parts(store, fresh))
    again = fetch_checkpoint(store, committed, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


class _RacingStore(_FailingStore):
    """Another attempt commits the same checkpoint just before this one writes its manifest."""

    def __init__(self, store: S3Store, rival: Any) -> None:
        super().__init__(store, fail_at=-1)
        self.rival = rival

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> bool:
        if key.endswith("/manifest.json") and "/parts-" not in key and self.rival is not None:
            rival, self.rival = self.rival, None
            rival()
        return self.store.put_bytes(key, data)


def test_loser_of_the_commit_race_deletes_its_parts(made: dict[str, Any], tmp_path: Path) -> None:
    store: S3Store = made["store"]
    manifest = read_manifest(store, made["awq"]["checkpoint"])
    assert manifest is not None
    folder = fetch_checkpoint(store, manifest, tmp_path)
    request = tiny_request("awq", sym=True)
    contested = checkpoint_id(request, "c" * 64)
    won: list[Any] = []

    def rival() -> None:
        won.append(commit_checkpoint(store, contested, folder, request, {"by": "rival"}))

    result, committed = commit_checkpoint(
        _RacingStore(store, rival), contested, folder, request, {"by": "loser"}
    )
    assert not committed and won[0][1] is True
    assert result == won[0][0] and result.info == {"by": "rival"}
    # Only the winner's parts remain (the winner swept the loser's in-flight parts, or the
    # loser removed its own: either way none are left).
    assert _parts(store, contested) == sorted(f.key for f in result.files)


def test_corrupt_object_is_a_named_error(made: dict[str, Any], tmp_path: Path) -> None:
    store: S3Store = made["store"]
    manifest = read_manifest(store, made["awq"]["checkpoint"])
    assert manifest is not None
    good = fetch_checkpoint(store, manifest, tmp_path / "good")
    assert (good / "model.safetensors").is_file()
    # A checkpoint whose safetensors bytes are garbage, committed with a matching sha256
    # (written by a broken tool), and one whose object no longer matches its manifest.
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64
    request = tiny_request("awq", sym=True)
    broken = checkpoint_id(request, "b" * 64)
    bad_folder = tmp_path / "bad"
    bad_folder.mkdir()
    (bad_folder / "model.safetensors").write_bytes(garbage)
    (bad_folder / "config.json").write_text("{}")
    committed, _ = commit_checkpoint(store, broken, bad_folder, request, {})
    with pytest.raises(InvalidArgument, match="not a valid safetensors file") as err:
        fetch_checkpoint(store, committed, tmp_path / "cache1")
    assert err.value.field.startswith("checkpoint.files[")
    tampered = committed.model_copy(
        update={"files": [f.model_copy(update={"sha256": "0" * 64}) for f in committed.files]}
    )
    with pytest.raises(InvalidArgument, match="is corrupt"):
        fetch_checkpoint(store, tampered, tmp_path / "cache2")
    assert not (tmp_path / "cache1" / "quantized" / broken).exists()


def test_loader_side_wait_finds_the_committed_checkpoint(
    made: dict[str, Any], tmp_path: Path
) -> None:
    folder = wait_for_checkpoint(tiny_request("gptq"), tmp_path, store=made["store"], poll_s=0.1)
    assert (folder / "manifest.json").is_file() and (folder / "qsens-quantize.json").is_file()
    with pytest.raises(Exception, match="did not appear"):
        wait_for_checkpoint(
            tiny_request("gptq", desc_act=True),
            tmp_path,
            store=made["store"],
            timeout_s=0.3,
            poll_s=0.1,
        )


async def test_quantize_job_through_the_worker(
    plane_env: Any, run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantize job on the real queue; bad group size dead-letters at once, no manifest."""
    from services.common import settings as settings_mod
    from services.common.dag import submit

    monkeypatch.setenv("QSENS_CACHE_DIR", str(tmp_path))
    settings_mod.reset()
    good = Job(
        kind=JobKind.QUANTIZE, run_id=run_id, params=tiny_request("gptq").model_dump(mode="json")
    )
    bad_request = tiny_request("awq").model_copy(
        update={"settings": {"bits": 4, "group_size": 256, "sym": False}}
    )
    bad = Job(kind=JobKind.QUANTIZE, run_id=run_id, params=bad_request.model_dump(mode="json"))
    async with open_plane() as plane:
        await submit(RunPlan(run_id=run_id, spec_hash="q", jobs=[good, bad]))
        async with worker(handle, (JobKind.QUANTIZE,)):
            summary = await wait_status(plane.state, run_id, ("failed", "succeeded"), 240.0)
        records = {r.job.id: r for r in await plane.state.list_jobs(run_id)}
        cal = load_calibration(CALIBRATION)
    assert summary.status == "failed"
    assert records[good.id].state.value == "done"
    assert records[good.id].result["calibration"]["sha256"] == cal.sha256
    assert records[bad.id].state.value == "dead"
    assert "group size 256 does not divide hidden_size=128" in (records[bad.id].error or "")
    assert read_manifest(plane.store, checkpoint_id(bad_request, cal.sha256)) is None


@pytest.mark.parametrize("sym", [False, True])
def test_matmul_clip_search_equals_gptqmodels(sym: bool) -> None:
    """The CPU clip search (batched matmuls) picks exactly what gptqmodel's own search picks."""
    import types

    import torch
    from gptqmodel.looper.awq_processor import AWQProcessor

    from services.quantizer import run

    installed = AWQProcessor._compute_best_clip
    # An in-process quantization earlier in the session may have installed the replacement.
    original = getattr(installed, "_qsens_original", installed)
    try:
        AWQProcessor._compute_best_clip = original
        run._clip_search_as_matmuls()
        replacement = AWQProcessor._compute_best_clip
        assert getattr(replacement, "_qsens", False) and replacement is not original
    finally:
        AWQProcessor._compute_best_clip = installed
    this = types.SimpleNamespace(qcfg=types.SimpleNamespace(group_size=64, sym=sym, bits=4))
    this._pseudo_quantize_tensor_into = types.MethodType(
        AWQProcessor._pseudo_quantize_tensor_into, this
    )
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(256, 192, generator=generator)
    x = torch.randn(1500, 192, generator=generator) * torch.linspace(0.1, 3, 192)
    expected = original(this, w, x)
    got = replacement(this, w, x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_a_verified_local_copy_is_committed_instead_of_quantizing_again(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new stack (fresh clone, wiped S3) on a machine whose model cache holds the checkpoint
    gets it back without quantizing; a tampered copy is ignored."""
    from services.common import settings as settings_mod

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QSENS_CACHE_DIR", str(tmp_path / "cache"))
    settings_mod.reset()
    try:
        store = AsyncS3Store()
        request = tiny_request("gptq", damp_percent=0.07)  # an address no other test makes
        made = asyncio.run(quantize_request(request, store))
        assert made["reused"] is False
        manifest = read_manifest(store.sync, made["checkpoint"])
        assert manifest is not None
        cached = fetch_checkpoint(store.sync, manifest, tmp_path / "cache")

        def wipe() -> None:  # the new stack's S3 has never seen the checkpoint
            keys = store.sync.list_keys(f"quantized/{made['checkpoint']}/")
            assert store.sync.delete(keys) == len(keys) > 0
            assert read_manifest(store.sync, made["checkpoint"]) is None

        wipe()
        again = asyncio.run(quantize_request(request, store))
        assert again["reused"] is True and again.get("from") == "local cache"
        assert again["checkpoint"] == made["checkpoint"]
        restored = read_manifest(store.sync, made["checkpoint"])
        assert restored is not None
        assert {(f.name, f.sha256) for f in restored.files} == {
            (f.name, f.sha256) for f in manifest.files
        }
        # A copy that no longer matches its manifest is not trusted: the job quantizes.
        wipe()
        weights = cached / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        fresh = asyncio.run(quantize_request(request, store))
        assert fresh["reused"] is False and "from" not in fresh
    finally:
        settings_mod.reset()
