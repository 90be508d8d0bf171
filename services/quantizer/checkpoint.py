"""Quantized checkpoints in S3: committed atomically, fetched into the model cache, verified.

Layout under ``quantized/<checkpoint id>/`` (the id is the content address, see
``services.common.quantization``)::

    parts-<attempt>/<file>   the checkpoint's files as one attempt uploaded them
    manifest.json            written LAST: the files (key, size, sha256), request, calibration

A checkpoint exists if and only if its manifest exists, so nothing ever reads a half-written
checkpoint. Parts no manifest names are garbage and are removed: an attempt whose upload fails
deletes what it wrote, an attempt that loses the commit race (the write-once store keeps the
first manifest) deletes its own parts, and the attempt that commits deletes the parts of every
other attempt (a worker killed mid-upload cannot clean up after itself). Deletion is best
effort: a refusal is logged and the orphans wait for the next commit of that checkpoint.
Fetching streams every file, checks its size and sha256 against the manifest and opens every
safetensors header (``services.common.s3folders``), so a corrupt object is a named error
instead of a crash inside the loader.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.common.errors import InvalidArgument, NotFound, QsensError
from services.common.logging import get_logger
from services.common.quantization import (
    CHECKPOINT_FORMAT,
    QuantizeRequest,
    checkpoint_id,
    checkpoint_prefix,
    manifest_key,
)
from services.common.s3folders import FolderFile, fetch_files, upload_files, verify_files

__all__ = [
    "INFO_FILE",
    "CheckpointFile",
    "Manifest",
    "checkpoint_info",
    "commit_checkpoint",
    "delete_stale_parts",
    "fetch_checkpoint",
    "read_manifest",
    "resolve_checkpoint_id",
    "verify_folder",
    "wait_for_checkpoint",
]

log = get_logger(__name__)

# Written by the quantize job inside the checkpoint folder: what made it (the loader reports it).
INFO_FILE = "qsens-quantize.json"


# One file of a checkpoint: name (relative path), key, size, sha256.
CheckpointFile = FolderFile


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


def _parts_prefix(checkpoint: str) -> str:
    return checkpoint_prefix(checkpoint) + "parts-"


def _delete(store: Any, keys: list[str], why: str, checkpoint: str) -> int:
    """Best-effort removal of orphaned parts; a refusal is logged, not raised."""
    if not keys:
        return 0
    try:
        store.delete(keys)
    except (QsensError, OSError) as err:
        log.warning(
            "could not delete orphaned checkpoint parts",
            extra={"checkpoint": checkpoint, "why": why, "keys": len(keys), "error": str(err)},
        )
        return 0
    log.info(
        "deleted orphaned checkpoint parts",
        extra={"checkpoint": checkpoint, "why": why, "keys": len(keys)},
    )
    return len(keys)


def delete_stale_parts(store: Any, manifest: Manifest) -> int:
    """Delete every ``parts-*`` object of the checkpoint that its manifest does not name;
    returns how many were deleted (0 when the store refused)."""
    named = {f.key for f in manifest.files}
    try:
        keys = store.list_keys(_parts_prefix(manifest.checkpoint))
    except (QsensError, OSError) as err:
        log.warning("could not list checkpoint parts", extra={"error": str(err)})
        return 0
    stale = [k for k in keys if k not in named]
    return _delete(store, stale, "parts of attempts that did not commit", manifest.checkpoint)


def _upload(store: Any, checkpoint: str, parts: str, folder: Path) -> list[FolderFile]:
    """Upload ``folder`` under ``parts``; on any failure delete what this attempt wrote."""
    try:
        return upload_files(store, parts, folder)
    except BaseException:
        # Best effort: the upload's own error is the one to raise.
        with contextlib.suppress(QsensError, OSError):
            _delete(store, store.list_keys(parts), "failed upload", checkpoint)
        raise


def commit_checkpoint(
    store: Any, checkpoint: str, folder: Path, request: QuantizeRequest, info: dict[str, Any]
) -> tuple[Manifest, bool]:
    """Upload ``folder`` and commit it; (manifest, False) when another attempt committed first.

    Parts no manifest names are deleted (see the module docstring)."""
    existing = read_manifest(store, checkpoint)
    if existing is not None:
        delete_stale_parts(store, existing)
        return existing, False
    parts = _parts_prefix(checkpoint) + f"{uuid.uuid4().hex[:12]}/"
    files = _upload(store, checkpoint, parts, folder)
    manifest = Manifest(
        checkpoint=checkpoint, request=request.model_dump(mode="json"), info=info, files=files
    )
    if store.put_bytes(manifest_key(checkpoint), manifest.model_dump_json(indent=1).encode()):
        delete_stale_parts(store, manifest)
        return manifest, True
    winner = read_manifest(store, checkpoint)
    assert winner is not None  # the write-once store refused ours because one exists
    _delete(store, [f.key for f in files], "lost the commit race", checkpoint)
    return winner, False


def verify_folder(folder: Path, manifest: Manifest) -> None:
    """Every file matches the manifest and every safetensors header parses; InvalidArgument if not."""
    verify_files(folder, manifest.files, "checkpoint.files", manifest.checkpoint)


def fetch_checkpoint(store: Any, manifest: Manifest, cache_dir: Path) -> Path:
    """Download a committed checkpoint into ``cache_dir/quantized/<id>`` (once, under a lock)."""
    return fetch_files(
        store,
        manifest.files,
        cache_dir / "quantized" / manifest.checkpoint,
        marker=("manifest.json", manifest.model_dump_json(indent=1).encode()),
        field="checkpoint.files",
        what=manifest.checkpoint,
    )


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
    on_state: Callable[[str, str], None] | None = None,
) -> Path:
    """Block until the quantize job has committed ``request``'s checkpoint, then fetch it.

    ``on_state(state, detail)`` hears ``"waiting"`` when the checkpoint is not there yet (the
    detail names the checkpoint and the quantize job that makes it) and ``"starting"`` when
    it is found (fetching, then loading follow)."""
    if store is None:
        from services.common.store import S3Store

        store = S3Store()
    checkpoint, _ = resolve_checkpoint_id(request, store)
    job = f"quantize {request.model}@{request.method}"
    started = time.monotonic()
    said = -say_every_s
    while True:
        manifest = read_manifest(store, checkpoint)
        if manifest is not None:
            if on_state is not None:
                on_state("starting", f"fetching and loading checkpoint {checkpoint}")
            return fetch_checkpoint(store, manifest, cache_dir)
        waited = time.monotonic() - started
        if timeout_s is not None and waited > timeout_s:
            raise NotFound(
                f"checkpoint {checkpoint} ({request.method} of {request.model}) did not appear "
                f"in {timeout_s:.0f} s: is a quantize job for it queued?"
            )
        if on_state is not None and said < 0:
            on_state("waiting", f"for checkpoint {checkpoint}, made by the job '{job}'")
        if waited - said >= say_every_s:
            said = waited
            log.info(
                "waiting for the quantize job's checkpoint",
                extra={
                    "checkpoint": checkpoint,
                    "job": job,
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
