"""Model folders in S3, against the real SeaweedFS: ``qsens models put`` uploads a folder once,
``resolve_source`` fetches ``s3://bucket/prefix/`` into the model cache (checked, atomic), a
real loader serves it, and bad folders are named errors that leave nothing in the cache."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.common import settings
from services.common.errors import InvalidArgument
from services.common.s3folders import MODEL_MANIFEST, ModelManifest
from services.common.store import S3Store
from services.loader.client import LoaderClient, PromptItem
from services.loader.model_source import resolve_source
from tests.conftest import PlaneEnv
from tests.loader_procs import start_loader

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny:llama?layers=2&hidden=64&heads=4&kv_heads=2&intermediate=128&seed=41"


@pytest.fixture
def env(s3_env: PlaneEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """S3 of the session and a model cache of this test's own."""
    monkeypatch.setenv("QSENS_CACHE_DIR", str(tmp_path / "cache"))
    settings.reset()
    return {**s3_env.env, "QSENS_CACHE_DIR": str(tmp_path / "cache")}


def _model_folder(tmp_path: Path) -> Path:
    """A tiny model folder with a file no other test has (so its digest is this test's)."""
    built = resolve_source(TINY, tmp_path / "build").folder
    folder = tmp_path / "tiny-ref"
    shutil.copytree(built, folder)
    (folder / "README.md").write_text(f"test folder {uuid.uuid4().hex}\n")
    return folder


def _qsens(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "qsens-source.json"
    }


def test_models_put_then_a_loader_serves_the_s3_source(env: dict[str, str], tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    done = _qsens(env, "models", "put", str(folder))
    assert done.returncode == 0, done.stderr
    uri = done.stdout.strip()
    match = re.fullmatch(r"s3://qsens-test/(models/tiny-ref-[0-9a-f]{16}/)", uri)
    assert match, uri
    store = S3Store()
    keys = store.list_keys(match[1])
    assert match[1] + MODEL_MANIFEST in keys
    manifest = ModelManifest.model_validate_json(store.get_bytes(match[1] + MODEL_MANIFEST))
    assert {f.name for f in manifest.files} == set(_files(folder))
    # Same folder, same key: a second put writes nothing.
    again = _qsens(env, "models", "put", str(folder))
    assert again.stdout.strip() == uri and store.list_keys(match[1]) == keys

    resolved = resolve_source(uri, tmp_path / "cache")
    assert resolved.folder.parent == tmp_path / "cache" / "models"
    assert _files(resolved.folder) == _files(folder)
    assert any("sha256 of every file checked" in n for n in resolved.notes)
    assert not [p for p in resolved.folder.parent.iterdir() if p.name.startswith(".tmp-")]
    # Fetched once: a second resolve finds the complete copy.
    (resolved.folder / "README.md").write_text("edited locally")
    assert resolve_source(uri, tmp_path / "cache").folder == resolved.folder
    assert (resolved.folder / "README.md").read_text() == "edited locally"

    loader = start_loader(uri, "fp32", env=env, extra_args=["--name", "s3tiny"])
    try:

        async def call() -> Any:
            async with LoaderClient(loader.address, expect_variant="s3tiny@fp32") as client:
                info = await client.info()
                out = await client.generate([PromptItem(prompt="Hello")], max_new_tokens=4)
                return info, out

        info, out = asyncio.run(call())
    finally:
        loader.stop()
    assert any(uri in note for note in info.notes)
    assert out[0].prompt_tokens > 0 and 1 <= len(out[0].token_ids) <= 4


def test_a_folder_uploaded_without_manifest_is_fetched_by_listing(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A folder another tool uploaded (no qsens-model.json): fetched, sizes and headers
    checked, cached under a key of its listing."""
    folder = _model_folder(tmp_path)
    store = S3Store()
    prefix = f"elsewhere/{uuid.uuid4().hex[:8]}/tiny/"
    for name, data in _files(folder).items():
        store.put_bytes(prefix + name, data)
    resolved = resolve_source(f"s3://qsens-test/{prefix}", tmp_path / "cache", name="x")
    assert _files(resolved.folder) == _files(folder) and resolved.name == "x"
    assert any("no qsens-model.json" in n for n in resolved.notes)
    source = json.loads((resolved.folder / "qsens-source.json").read_text())
    assert source["sha256_checked"] is False


def _put_manifest(store: S3Store, prefix: str, files: list[dict[str, Any]]) -> None:
    manifest = {"name": "bad", "digest": "0" * 16, "files": files}
    store.put_bytes(prefix + MODEL_MANIFEST, json.dumps(manifest).encode())


def test_bad_folders_are_named_errors_and_leave_no_cache(
    env: dict[str, str], tmp_path: Path
) -> None:
    store = S3Store()
    cache = tmp_path / "cache"
    base = f"bad/{uuid.uuid4().hex[:8]}"

    with pytest.raises(InvalidArgument, match="no objects below it") as err:
        resolve_source(f"s3://qsens-test/{base}/empty/", cache)
    assert err.value.field == "model"

    store.put_bytes(f"{base}/noconfig/model.safetensors", b"x")
    with pytest.raises(InvalidArgument, match=r"no config\.json"):
        resolve_source(f"s3://qsens-test/{base}/noconfig/", cache)

    # An object whose bytes are not what the manifest says (replaced by hand).
    corrupt = f"{base}/corrupt/"
    store.put_bytes(corrupt + "config.json", b"{}")
    row = {"name": "config.json", "key": corrupt + "config.json", "size": 2, "sha256": "0" * 64}
    _put_manifest(store, corrupt, [row])
    with pytest.raises(InvalidArgument, match="is corrupt") as err:
        resolve_source(f"s3://qsens-test/{corrupt}", cache)
    assert err.value.field == "model.files[0]"

    # Garbage where a safetensors file should be, with a matching size and no manifest.
    garbage = f"{base}/garbage/"
    store.put_bytes(garbage + "config.json", b"{}")
    store.put_bytes(garbage + "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(InvalidArgument, match="not a valid safetensors file"):
        resolve_source(f"s3://qsens-test/{garbage}", cache)

    # A manifest naming a file outside the folder.
    escape = f"{base}/escape/"
    store.put_bytes(escape + "config.json", b"{}")
    row = {"name": "../../evil", "key": escape + "config.json", "size": 2, "sha256": None}
    _put_manifest(store, escape, [{**row, "name": "config.json"}, row])
    with pytest.raises(InvalidArgument, match="would leave the folder"):
        resolve_source(f"s3://qsens-test/{escape}", cache)
    assert not (tmp_path / "evil").exists()

    with pytest.raises(InvalidArgument, match="bad bucket name"):
        resolve_source("s3://X/models/y/", cache)
    models = cache / "models"
    assert (
        not models.exists()
        or [p.name for p in models.iterdir() if not p.name.startswith(".")] == []
    )


def test_models_put_refuses_a_folder_that_is_not_a_model(
    env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    done = _qsens(env, "models", "put", str(tmp_path / "notes"))
    assert done.returncode == 2 and "no config.json" in done.stderr
    done = _qsens(env, "models", "put", str(_model_folder(tmp_path)), "--name", "Bad Name")
    assert done.returncode == 2 and "--name" in done.stderr
