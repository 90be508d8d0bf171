"""Quantized checkpoints in S3: committed atomically, fetched into the model cache, verified.

Layout under ``quantized/<checkpoint id>/`` (the id is the content address, see
``services.common.quantization``)::

    parts-<attempt>/<file>   the checkpoint's files as one attempt uploaded them
    manifest.json            written LAST: the files (key, size, sha256), request, calibration

A checkpoint exists if and only if its manifest exists. An attempt that dies half-way leaves
only its own ``parts-<attempt>/`` objects, which no manifest names, so nothing ever reads a
half-written checkpoint; two attempts racing both upload, and the write-once store keeps the
first manifest (the loser's parts are orphans). Fetching checks every file's size and sha256
against the manifest and opens every safetensors header, so a corrupt object is a named error
instead of a crash inside the loader.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.common.errors import InvalidArgument, NotFound
from services.common.logging import get_logger
from services.common.quantization import (
    CHECKPOINT_FORMAT,
    QuantizeRequest,
    checkpoint_id,
    checkpoint_prefix,
    manifest_key,
)

__all__ = [
    "INFO_FILE",
    "CheckpointFile",
    "Manifest",
    "checkpoint_info",
    "commit_checkpoint",
    "fetch_checkpoint",
    "read_manifest",
    "resolve_checkpoint_id",
    "verify_folder",
    "wait_for_checkpoint",
]

log = get_logger(__name__)

# Written by the quantize job inside the checkpoint folder: what made it (the loader reports it).
INFO_FILE = "qsens-quantize.json"


class CheckpointFile(BaseModel):
    """One file of a checkpoint."""

    name: str = Field(description="Path relative to the checkpoint folder.")
    key: str = Field(description="S3 key of its bytes.")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str = Field(description="Hex sha256 of its bytes.")


class Manifest(BaseModel):
    """The commit record of a checkpoint."""

    format: str = Field(CHECKPOINT_FORMAT, description="Layout version.")
    checkpoint: str = Field(description="The checkpoint id (content address).")
    request: dict[str, Any] = Field(description="The quantize request that made it.")
    info: dict[str, Any] = Field(default_factory=dict, description="Calibration, timings, libs.")
    files: list[CheckpointFile] = Field(description="Every file of the checkpoint.")
    created_at: float = Field(default_factory=time.time, description="Unix time of the commit.")

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(store: Any, checkpoint: str) -> Manifest | None:
    """The committed manifest of ``checkpoint`` or None when it does not exist (yet)."""
    try:
        raw = store.get_bytes(manifest_key(checkpoint))
    except NotFound:
        return None
    try:
        return Manifest.model_validate_json(raw)
    except ValueError as err:
        raise InvalidArgument(
            "checkpoint", f"manifest of {checkpoint} is malformed: {err}"
        ) from None


def commit_checkpoint(
    store: Any, checkpoint: str, folder: Path, request: QuantizeRequest, info: dict[str, Any]
) -> tuple[Manifest, bool]:
    """Upload ``folder`` and commit it; (manifest, False) when another attempt committed first."""
    existing = read_manifest(store, checkpoint)
    if existing is not None:
        return existing, False
    parts = checkpoint_prefix(checkpoint) + f"parts-{uuid.uuid4().hex[:12]}/"
    files: list[CheckpointFile] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        store.put_bytes(parts + name, data)
        files.append(
            CheckpointFile(
                name=name, key=parts + name, size=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        )
    manifest = Manifest(
        checkpoint=checkpoint, request=request.model_dump(mode="json"), info=info, files=files
    )
    if store.put_bytes(manifest_key(checkpoint), manifest.model_dump_json(indent=1).encode()):
        return manifest, True
    winner = read_manifest(store, checkpoint)
    assert winner is not None  # the write-once store refused ours because one exists
    return winner, False


def verify_folder(folder: Path, manifest: Manifest) -> None:
    """Every file matches the manifest and every safetensors header parses; InvalidArgument if not."""
    from safetensors import safe_open

    for i, entry in enumerate(manifest.files):
        path = folder / entry.name
        field = f"checkpoint.files[{i}]"
        if not path.is_file():
            raise InvalidArgument(field, f"{entry.name} of {manifest.checkpoint} is missing")
        size = path.stat().st_size
        if size != entry.size or _sha256(path) != entry.sha256:
            raise InvalidArgument(
                field,
                f"{entry.name} of {manifest.checkpoint} is corrupt: its bytes ({size}) do not "
                f"match the manifest ({entry.size} bytes, sha256 {entry.sha256[:12]}...)",
            )
        if entry.name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="numpy") as handle:
                    list(handle.keys())
            except Exception as err:  # safetensors raises its own SafetensorError
                raise InvalidArgument(
                    field,
                    f"{entry.name} of {manifest.checkpoint} is not a valid safetensors file: {err}",
                ) from None


def fetch_checkpoint(store: Any, manifest: Manifest, cache_dir: Path) -> Path:
    """Download a committed checkpoint into ``cache_dir/quantized/<id>`` (once, under a lock)."""
    target = cache_dir / "quantized" / manifest.checkpoint
    marker = target / "manifest.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{manifest.checkpoint}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            for entry in manifest.files:
                path = tmp / entry.name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.get_bytes(entry.key))
            verify_folder(tmp, manifest)
            (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=1))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("checkpoint fetched", extra={"checkpoint": manifest.checkpoint, "folder": str(target)})
    return target


def resolve_checkpoint_id(request: QuantizeRequest, store: Any) -> tuple[str, dict[str, Any]]:
    """(checkpoint id, calibration description) of ``request`` (reads the calibration set)."""
    from services.quantizer.calibration import load_calibration

    calibration = load_calibration(request.calibration, store)
    return checkpoint_id(request, calibration.sha256), calibration.describe()


def wait_for_checkpoint(
    request: QuantizeRequest,
    cache_dir: Path,
    *,
    store: Any | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    say_every_s: float = 60.0,
) -> Path:
    """Block until the quantize job has committed ``request``'s checkpoint, then fetch it."""
    if store is None:
        from services.common.store import S3Store

        store = S3Store()
    checkpoint, _ = resolve_checkpoint_id(request, store)
    started = time.monotonic()
    said = -say_every_s
    while True:
        manifest = read_manifest(store, checkpoint)
        if manifest is not None:
            return fetch_checkpoint(store, manifest, cache_dir)
        waited = time.monotonic() - started
        if timeout_s is not None and waited > timeout_s:
            raise NotFound(
                f"checkpoint {checkpoint} ({request.method} of {request.model}) did not appear "
                f"in {timeout_s:.0f} s: is a quantize job for it queued?"
            )
        if waited - said >= say_every_s:
            said = waited
            log.info(
                "waiting for the quantize job's checkpoint",
                extra={
                    "checkpoint": checkpoint,
                    "key": manifest_key(checkpoint),
                    "waited_s": round(waited),
                },
            )
        time.sleep(poll_s)


def checkpoint_info(folder: Path) -> dict[str, Any]:
    """The quantize job's record inside a checkpoint folder ({} for a published checkpoint)."""
    path = folder / INFO_FILE
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
