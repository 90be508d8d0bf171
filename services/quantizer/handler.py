"""The ``quantize`` job handler: make (or reuse) a content-addressed GPTQ/AWQ checkpoint in S3.

The checkpoint's address is computed from the request and the calibration set's sha256
(``services.common.quantization.checkpoint_id``); when its manifest exists the job returns at
once with ``reused: true``; when this machine's model cache holds a verified copy (a loader
fetched it for an earlier stack) that copy is committed instead of quantizing again.
Otherwise it quantizes in a child process (``services.quantizer.run``)
while this process keeps the job's heartbeat going, then uploads the files and writes the
manifest last (``services.quantizer.checkpoint.commit_checkpoint``, which also deletes parts
of attempts that did not commit; a reusing job deletes any left by killed attempts).

The job's result is also written once to ``runs/<run>/<model>@<method>/quantize/result.json``
(``services.common.artefacts.quantize_key``), where the analyzer reads it for the report; a
redelivered job returns the record already there, so a run has one answer per variant.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.common import settings as settings_mod
from services.common.artefacts import quantize_key
from services.common.contracts.quantize import QuantizeResult
from services.common.errors import FailedPrecondition, InvalidArgument, QsensError
from services.common.handlers import JobContext, KindHandler, registry_handler
from services.common.jobs import Job, JobKind
from services.common.quantization import QuantizeRequest, manifest_key
from services.quantizer import run as runner
from services.quantizer.calibration import CalibrationSet, load_calibration
from services.quantizer.checkpoint import (
    Manifest,
    commit_checkpoint,
    delete_stale_parts,
    read_manifest,
    verify_folder,
)

__all__ = ["HANDLERS", "handle", "quantize_request", "record_result", "result_key"]

HEARTBEAT_S = 10.0
_ERRORS: dict[str, type[Exception]] = {
    "InvalidArgument": InvalidArgument,
    "FailedPrecondition": FailedPrecondition,
}


def _result(manifest: Manifest, reused: bool, seconds: float) -> dict[str, Any]:
    info = manifest.info
    return {
        "checkpoint": manifest.checkpoint,
        "manifest_key": manifest_key(manifest.checkpoint),
        "reused": reused,
        "method": manifest.request.get("method"),
        "settings": manifest.request.get("settings"),
        "calibration": info.get("calibration", {}),
        "quantize_seconds": info.get("quantize_seconds"),
        "job_seconds": round(seconds, 2),
        "size_bytes": manifest.size_bytes,
        "files": len(manifest.files),
        "libraries": info.get("libraries", {}),
    }


async def _run_child(
    request: QuantizeRequest, calibration: CalibrationSet, workdir: Path, ctx: JobContext | None
) -> dict[str, Any]:
    cache_dir = settings_mod.get(settings_mod.CommonSettings).cache_dir
    (workdir / runner.REQUEST_FILE).write_text(
        json.dumps(
            {
                "request": request.model_dump(mode="json"),
                "calibration": {
                    "name": calibration.name,
                    "texts": list(calibration.texts),
                    "sha256": calibration.sha256,
                    "size_bytes": calibration.size_bytes,
                },
                "cache_dir": str(cache_dir),
            }
        )
    )
    log_path = workdir / "quantize.log"
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.quantizer.run",
            str(workdir),
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            while True:
                try:
                    code = await asyncio.wait_for(proc.wait(), HEARTBEAT_S)
                    break
                except TimeoutError:
                    if ctx is not None:
                        await ctx.heartbeat()
        except BaseException:
            # Cancelled (worker stopping): the child must not outlive the job.
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
    error = workdir / runner.ERROR_FILE
    if code == 2 and error.is_file():
        doc = json.loads(error.read_text())
        kind = _ERRORS.get(doc.get("type", ""), InvalidArgument)
        if kind is InvalidArgument:
            raise InvalidArgument(doc.get("field") or "params", doc.get("message", ""))
        raise kind(doc.get("message", ""))
    if code != 0:
        tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        raise RuntimeError(f"quantization failed (exit {code}); last output:\n{tail}")
    result: dict[str, Any] = json.loads((workdir / runner.RESULT_FILE).read_text())
    return result


async def quantize_request(
    request: QuantizeRequest, store: Any, ctx: JobContext | None = None
) -> dict[str, Any]:
    """Make or reuse ``request``'s checkpoint; ``store`` is an ``AsyncS3Store``."""
    from services.common.quantization import checkpoint_id

    started = time.perf_counter()
    sync_store = store.sync
    calibration = await asyncio.to_thread(load_calibration, request.calibration, sync_store)
    checkpoint = checkpoint_id(request, calibration.sha256)
    existing = await asyncio.to_thread(read_manifest, sync_store, checkpoint)
    if existing is not None:
        # Parts of attempts killed before they could clean up go now (cheap: one listing).
        await asyncio.to_thread(delete_stale_parts, sync_store, existing)
        return _result(existing, True, time.perf_counter() - started)
    cached = await asyncio.to_thread(_from_local_cache, sync_store, checkpoint, request)
    if cached is not None:
        return {**_result(cached, True, time.perf_counter() - started), "from": "local cache"}
    with tempfile.TemporaryDirectory(prefix="qsens-quantize-") as tmp:
        info = await _run_child(request, calibration, Path(tmp), ctx)
        manifest, committed = await asyncio.to_thread(
            commit_checkpoint,
            sync_store,
            checkpoint,
            Path(tmp) / runner.CHECKPOINT_DIR,
            request,
            info,
        )
    return _result(manifest, not committed, time.perf_counter() - started)


def _from_local_cache(store: Any, checkpoint: str, request: QuantizeRequest) -> Manifest | None:
    """Commit ``checkpoint`` from this machine's model cache when a loader fetched it before.

    The address covers the source, the settings and the calibration set's sha256, so a copy
    under ``<cache_dir>/quantized/<id>`` whose files match its manifest is that checkpoint: a
    new stack (a fresh clone, a wiped S3) gets it back without quantizing again. Anything
    that does not verify is ignored and the job quantizes."""
    import shutil

    folder = settings_mod.get(settings_mod.CommonSettings).cache_dir / "quantized" / checkpoint
    try:
        manifest = Manifest.model_validate_json((folder / "manifest.json").read_bytes())
        if manifest.checkpoint != checkpoint:
            return None
        verify_folder(folder, manifest)
    except (OSError, ValueError, QsensError):
        return None
    with tempfile.TemporaryDirectory(prefix="qsens-quantize-cache-") as tmp:
        staged = Path(tmp)
        for f in manifest.files:  # only the checkpoint's files, not the cache's marker
            (staged / f.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / f.name, staged / f.name)
        committed, _ = commit_checkpoint(store, checkpoint, staged, request, manifest.info)
    return committed


async def record_result(
    store: Any, run_id: str, request: QuantizeRequest, result: dict[str, Any]
) -> dict[str, Any]:
    """Write ``result`` once as the run's record of ``request``'s variant; returns what is stored.

    ``store`` is an ``AsyncS3Store``. The variant id is ``<model>@<method>`` (the planner's
    ``PlannedVariant.id``: the precision's value is the method). Write-once: when an earlier
    attempt of the job wrote it, that record stands (it may say ``reused: false`` where this
    attempt would say ``true``, because the earlier attempt made the checkpoint)."""
    variant = f"{request.model}@{request.method}"
    key = result_key(run_id, request)
    doc = {
        **result,
        "run_id": run_id,
        "variant": variant,
        "model": request.model,
        "source": request.source,
        "calibration_request": request.calibration.model_dump(mode="json"),
        "result_key": key,
    }
    QuantizeResult.model_validate(doc)  # the contract the analyzer reads
    if not await store.put_json(key, doc):
        stored: dict[str, Any] = await store.get_json(key)
        return stored
    return doc


def result_key(run_id: str, request: QuantizeRequest) -> str:
    """Where the run's record of ``request``'s variant goes (``<model>@<method>``)."""
    return quantize_key(run_id, f"{request.model}@{request.method}", "result.json")


def _summary(stored: QuantizeResult, key: str) -> dict[str, Any]:
    return stored.model_dump(mode="json", by_alias=True, exclude_unset=True)


async def _quantize(job: Job, request: QuantizeRequest, ctx: JobContext) -> dict[str, Any]:
    result = await quantize_request(request, ctx.store, ctx)
    return await record_result(ctx.store, job.run_id, request, result)


#: The quantizer's one kind: the request, the run's record of it, and the work.
HANDLERS: dict[JobKind, KindHandler[Any, Any]] = {
    JobKind.QUANTIZE: KindHandler(
        JobKind.QUANTIZE, QuantizeRequest, _quantize, QuantizeResult, result_key, _summary
    )
}

handle = registry_handler(HANDLERS)
"""Run one quantize job and record its result under the run (``dispatch`` over ``HANDLERS``)."""
