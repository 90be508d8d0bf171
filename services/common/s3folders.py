"""Folders of files in S3 (model weights, quantized checkpoints): upload, fetch, verify.

A folder in S3 is a list of ``FolderFile`` rows (name relative to the folder, object key, size,
sha256). ``upload_files`` writes a local folder's files below a prefix and returns the rows;
``fetch_files`` brings them into a local folder through a temporary sibling and one rename
under a file lock, so a reader never sees half a folder and two processes fetch once. Every
file's size (and sha256, when the rows know it) is checked while it streams to disk, names
cannot leave the folder, and every ``.safetensors`` header must parse: a corrupt object is a
named ``InvalidArgument`` instead of a crash inside ``from_pretrained``.

Model folders (``qsens models put``, ``s3://bucket/prefix/`` model sources): ``put_model_folder``
uploads a folder under ``models/<name>-<digest>/`` and writes ``qsens-model.json`` (the rows,
with sha256) last; ``fetch_model_folder`` fetches any ``s3://`` folder into the model cache,
checking each sha256 against that manifest when there is one. A folder uploaded by another
tool has no manifest: its cache folder is keyed by the listing (names, sizes, ETags), and
sizes and safetensors headers are checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.hashing import stable_hash
from services.common.logging import get_logger
from services.common.store import S3Store, check_key

__all__ = [
    "MODELS_PREFIX",
    "MODEL_MANIFEST",
    "FolderFile",
    "ModelManifest",
    "fetch_files",
    "fetch_model_folder",
    "file_sha256",
    "put_model_folder",
    "upload_files",
    "verify_files",
]

log = get_logger(__name__)

MODEL_MANIFEST = "qsens-model.json"
MODEL_FORMAT = "qsens-model-folder/1"
MODELS_PREFIX = "models/"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")


class FolderFile(BaseModel):
    """One file of a folder in S3."""

    name: str = Field(description="Path relative to the folder.")
    key: str = Field(description="S3 key of its bytes.")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str | None = Field(description="Hex sha256 of its bytes (None: not known before).")


class ModelManifest(BaseModel):
    """``qsens-model.json``: what ``put_model_folder`` uploaded."""

    format: str = Field(MODEL_FORMAT, description="Layout version.")
    name: str = Field(description="The folder's name (the key's <name>).")
    digest: str = Field(description="sha256 prefix over the files' names, sizes and sha256.")
    files: list[FolderFile] = Field(description="Every file of the folder.")
    created_at: float = Field(default_factory=time.time, description="Unix time of the upload.")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every file below ``folder`` except hidden ones, sorted."""
    return [
        (p.relative_to(folder).as_posix(), p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def upload_files(store: S3Store, prefix: str, folder: Path) -> list[FolderFile]:
    """Write every file of ``folder`` at ``prefix + name``; the rows, with sha256.

    A key that exists already must hold the same bytes (FailedPrecondition if not): a content-
    addressed prefix may have been half-uploaded before."""
    rows: list[FolderFile] = []
    for name, path in _local_files(folder):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = check_key(prefix + name, "key")
        if (
            not store.put_bytes(key, data)
            and hashlib.sha256(store.get_bytes(key)).hexdigest() != sha
        ):
            raise FailedPrecondition(
                f"s3://{store.bucket}/{key} already holds other content; objects are written once"
            )
        rows.append(FolderFile(name=name, key=key, size=len(data), sha256=sha))
    return rows


def _safe_name(name: str, field: str) -> str:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
        raise InvalidArgument(field, f"file name {name!r} would leave the folder")
    return name


def verify_files(folder: Path, files: Iterable[FolderFile], field: str, what: str) -> None:
    """Every row's file is in ``folder`` with its size and sha256, and every safetensors header
    parses; InvalidArgument naming ``field[i]`` and ``what`` if not."""
    from safetensors import safe_open

    for i, entry in enumerate(files):
        path = folder / _safe_name(entry.name, f"{field}[{i}]")
        if not path.is_file():
            raise InvalidArgument(f"{field}[{i}]", f"{entry.name} of {what} is missing")
        size = path.stat().st_size
        if size != entry.size or (entry.sha256 is not None and file_sha256(path) != entry.sha256):
            expected = f"{entry.size} bytes" + (
                f", sha256 {entry.sha256[:12]}..." if entry.sha256 else ""
            )
            raise InvalidArgument(
                f"{field}[{i}]",
                f"{entry.name} of {what} is corrupt: its bytes ({size}) do not match the "
                f"manifest ({expected})",
            )
        _check_safetensors(path, entry.name, f"{field}[{i}]", what, safe_open)


def _check_safetensors(path: Path, name: str, field: str, what: str, safe_open: Any) -> None:
    if not name.endswith(".safetensors"):
        return
    try:
        with safe_open(str(path), framework="numpy") as handle:
            list(handle.keys())
    except Exception as err:  # safetensors raises its own SafetensorError
        raise InvalidArgument(
            field, f"{name} of {what} is not a valid safetensors file: {err}"
        ) from None


def _fetch_one(store: S3Store, entry: FolderFile, folder: Path, field: str, what: str) -> None:
    """Stream one file into ``folder`` and check it (the digest is taken while it streams)."""
    from safetensors import safe_open

    path = folder / _safe_name(entry.name, field)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        size, sha = store.download(entry.key, path)
    except NotFound:
        raise InvalidArgument(field, f"{entry.name} of {what} is missing in S3") from None
    if size != entry.size or (entry.sha256 is not None and sha != entry.sha256):
        expected = f"{entry.size} bytes" + (
            f", sha256 {entry.sha256[:12]}..." if entry.sha256 else ""
        )
        raise InvalidArgument(
            field,
            f"{entry.name} of {what} is corrupt: its bytes ({size}, sha256 {sha[:12]}...) do not "
            f"match the manifest ({expected})",
        )
    _check_safetensors(path, entry.name, field, what, safe_open)


def fetch_files(
    store: S3Store,
    files: list[FolderFile],
    target: Path,
    *,
    marker: tuple[str, bytes],
    field: str,
    what: str,
) -> Path:
    """Download ``files`` into ``target`` once: ``marker`` (name, bytes) is written last and
    says the folder is complete. Returns ``target``."""
    done = target / marker[0]
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            for i, entry in enumerate(files):
                _fetch_one(store, entry, tmp, f"{field}[{i}]", what)
            (tmp / marker[0]).write_bytes(marker[1])
            if target.exists():  # a folder without its marker: an earlier copy that died
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("folder fetched from S3", extra={"what": what, "folder": str(target)})
    return target


def _folder_digest(files: Iterable[FolderFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()[:16]


def put_model_folder(folder: Path, *, name: str | None = None, store: S3Store | None = None) -> str:
    """Upload a model folder (config.json, weights, tokenizer) under ``models/<name>-<digest>/``
    with ``qsens-model.json`` written last; returns the ``s3://bucket/models/.../`` source.
    Uploading the same folder again writes nothing."""
    local = folder.expanduser()
    if not (local / "config.json").is_file():
        raise InvalidArgument("FOLDER", f"{local} is not a model folder (no config.json)")
    label = (name or local.resolve().name).strip().lower()
    if not _NAME.match(label):
        raise InvalidArgument(
            "--name", f"{label!r}: use lower-case letters, digits, '.', '_' and '-' (<= 80)"
        )
    target = store or S3Store()
    target.ensure_bucket()
    files = _local_files(local)
    digest = _folder_digest(
        FolderFile(name=n, key="", size=p.stat().st_size, sha256=file_sha256(p)) for n, p in files
    )
    prefix = f"{MODELS_PREFIX}{label}-{digest}/"
    uri = f"s3://{target.bucket}/{prefix}"
    if target.exists(prefix + MODEL_MANIFEST):
        return uri
    rows = upload_files(target, prefix, local)
    manifest = ModelManifest(name=label, digest=digest, files=rows)
    target.put_bytes(prefix + MODEL_MANIFEST, manifest.model_dump_json(indent=1).encode())
    return uri


def _model_files(store: S3Store, prefix: str, uri: str) -> tuple[list[FolderFile], str, bool]:
    """(files, cache id, whether sha256-checked) of the model folder at ``prefix``."""
    listed = [o for o in store.list_objects(prefix) if o.key != prefix]
    if not listed:
        raise InvalidArgument(
            "model", f"{uri}: no objects below it in S3 (upload a folder with `qsens models put`)"
        )
    names = {o.key[len(prefix) :] for o in listed}
    if MODEL_MANIFEST in names:
        try:
            manifest = ModelManifest.model_validate_json(store.get_bytes(prefix + MODEL_MANIFEST))
        except ValidationError as err:
            raise InvalidArgument("model", f"{uri}{MODEL_MANIFEST} is malformed: {err}") from None
        files = manifest.files
        cache_id = _folder_digest(files)
        checked = True
    else:
        files = [
            FolderFile(name=o.key[len(prefix) :], key=o.key, size=o.size, sha256=None)
            for o in listed
        ]
        cache_id = stable_hash(
            [[f.name, f.size, o.etag] for f, o in zip(files, listed, strict=True)], 16
        )
        checked = False
    if not any(f.name == "config.json" for f in files):
        raise InvalidArgument("model", f"{uri} is not a model folder (no config.json)")
    return files, cache_id, checked


def fetch_model_folder(
    uri: str, cache_dir: Path, *, store: S3Store | None = None
) -> tuple[Path, tuple[str, ...]]:
    """The local copy of the model folder at ``s3://bucket/prefix/`` under
    ``<cache_dir>/models/s3-<name>-<id>``, and notes for Info."""
    from services.common.datafiles import parse_s3

    bucket, key = parse_s3(uri, "model")
    base = store or S3Store()
    source = (
        base
        if bucket == base.bucket
        else S3Store(base.settings.model_copy(update={"bucket": bucket}))
    )
    prefix = key + "/"
    files, cache_id, checked = _model_files(source, prefix, uri)
    label = re.sub(r"[^a-z0-9._-]", "-", key.rsplit("/", 1)[-1].lower())[:60]
    target = cache_dir / "models" / f"s3-{label}-{cache_id}"
    marker = {"source": uri, "sha256_checked": checked, "files": [f.model_dump() for f in files]}
    folder = fetch_files(
        source,
        files,
        target,
        marker=("qsens-source.json", json.dumps(marker, indent=1).encode()),
        field="model.files",
        what=uri,
    )
    note = f"fetched from {uri}" + (
        " (sha256 of every file checked against its qsens-model.json)"
        if checked
        else " (no qsens-model.json: sizes and safetensors headers checked)"
    )
    return folder, (note,)
