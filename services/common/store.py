"""The artefact store: one S3 bucket, keys ``runs/<run_id>/...``, every object written once.

``put_bytes`` sends ``If-None-Match: *``, so the server itself refuses to replace an object:
a job that is redelivered after a crash finds its earlier outputs in place (``False``) instead
of overwriting them, and two runs cannot mix because every key is built by ``run_key`` from a
validated run id and validated parts. On first use the store checks that the server honours
the condition (``S3Settings.check_write_once``), since an S3 server that ignores it would
silently overwrite.

``S3Store`` is synchronous (CLI, analyzer); ``AsyncS3Store`` runs the same calls in a thread
so a worker's event loop, and with it the job heartbeat, keeps running during transfers.
Large objects (model weights) are downloaded to a file in chunks (``download``) rather than
held in memory. ``delete`` exists for objects no record points at (the parts of a quantize
attempt that did not commit); artefacts are never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from services.common import settings as settings_mod
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.jobs import validate_run_id
from services.common.settings import S3Settings
from services.common.tensor_codec import load_safetensors, save_safetensors

__all__ = ["AsyncS3Store", "S3Store", "StoredObject", "check_key", "run_key", "run_prefix"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Codes S3 servers use when a conditional write loses: the object exists (412), or a
# concurrent conditional write to the same key is in progress (409).
_EXISTS_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing shows it."""

    key: str
    size: int
    etag: str


def _check_part(part: str, field: str) -> str:
    if not isinstance(part, str) or not part:
        raise InvalidArgument(field, "empty key part")
    if part in (".", "..") or "/" in part or "\\" in part:
        raise InvalidArgument(
            field, f"unsafe key part {part!r} ('/', '\\\\', '.' and '..' are refused)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in part):
        raise InvalidArgument(field, f"control character in key part {part!r}")
    if len(part.encode("utf-8")) > 255:
        raise InvalidArgument(field, "key part longer than 255 bytes")
    return part


def run_prefix(run_id: str) -> str:
    """``runs/<run_id>/``: everything a run writes lives below it."""
    return f"runs/{validate_run_id(run_id)}/"


def run_key(run_id: str, *parts: str) -> str:
    """``runs/<run_id>/<part>/...``; each part must be a single safe path segment."""
    if not parts:
        raise InvalidArgument("parts", "a run key needs at least one part below the run")
    checked = [_check_part(p, f"parts[{i}]") for i, p in enumerate(parts)]
    return run_prefix(run_id) + "/".join(checked)


def check_key(key: str, field: str = "key") -> str:
    """Return ``key`` if every '/'-separated segment is safe (no '..', no empty segments)."""
    if not key or key.startswith("/") or len(key.encode("utf-8")) > 1024:
        raise InvalidArgument(field, f"bad object key {key!r}")
    for i, part in enumerate(key.split("/")):
        _check_part(part, f"{field}[{i}]")
    return key


class S3Store:
    """Write-once object storage in the configured bucket (sync; see AsyncS3Store)."""

    def __init__(self, settings: S3Settings | None = None, *, client: Minio | None = None) -> None:
        self.settings = settings or settings_mod.get(S3Settings)
        self.bucket = self.settings.bucket
        self._client = client
        self._ready = False
        self._lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> Minio:
        """The minio client (created on first use; no connection at construction)."""
        if self._client is None:
            cfg = self.settings
            self._client = Minio(
                cfg.endpoint,
                access_key=cfg.access_key.get_secret_value() if cfg.access_key else None,
                secret_key=cfg.secret_key.get_secret_value() if cfg.secret_key else None,
                secure=cfg.secure,
                region=cfg.region,
                # minio's default waits minutes to connect; a dead endpoint should fail fast.
                http_client=urllib3.PoolManager(
                    timeout=urllib3.Timeout(connect=5.0, read=120.0),
                    maxsize=16,
                    retries=urllib3.Retry(
                        total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
                    ),
                ),
            )
        return self._client

    def _call(self, what: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except S3Error:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise Unavailable(
                f"S3 at {self.settings.endpoint} unreachable during {what}: {err}"
            ) from err

    def ensure_bucket(self) -> None:
        """Create the bucket if needed and check write-once support (once per store)."""
        with self._lock:
            if self._ready:
                return
            try:
                if not self._call("bucket check", self.client.bucket_exists, self.bucket):
                    try:
                        self._call("bucket creation", self.client.make_bucket, self.bucket)
                    except S3Error as err:
                        if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
            except S3Error as err:
                raise Unavailable(
                    f"S3 bucket {self.bucket!r} at {self.settings.endpoint}: {err.code}: {err.message}"
                ) from err
            if self.settings.check_write_once:
                self._probe_write_once()
            self._ready = True

    def _probe_write_once(self) -> None:
        key = f"_qsens/write-once-probe/{uuid.uuid4().hex}"
        first = self._put_if_absent(key, b"1", "text/plain")
        second = self._put_if_absent(key, b"2", "text/plain")
        with contextlib.suppress(S3Error):
            self.client.remove_object(self.bucket, key)
        if not first or second:
            raise FailedPrecondition(
                f"S3 server at {self.settings.endpoint} does not honour If-None-Match; objects "
                "could be overwritten (use MinIO or SeaweedFS, or a newer server)"
            )

    def _put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        headers: dict[str, str | list[str] | tuple[str]] = {
            "If-None-Match": "*",
            "Content-Type": content_type,
        }
        try:
            # Minio.put_object cannot send conditional headers; _put_object is the single-PUT
            # primitive underneath it (objects up to 5 GiB, far above our artefacts).
            self._call("put", self.client._put_object, self.bucket, key, data, headers=headers)
        except S3Error as err:
            if err.code in _EXISTS_CODES:
                return False
            raise
        return True

    # -- bytes ----------------------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Write ``data`` at ``key`` unless it exists: True if written, False if already there."""
        check_key(key)
        self.ensure_bucket()
        return self._put_if_absent(key, bytes(data), content_type)

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; NotFound if missing."""
        check_key(key)
        self.ensure_bucket()
        try:
            response = self._call("get", self.client.get_object, self.bucket, key)
        except S3Error as err:
            if err.code in _MISSING_CODES:
                raise NotFound(f"no object {key!r} in bucket {self.bucket!r}") from None
            raise
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        check_key(key)
        self.ensure_bucket()
        try:
            self._call("stat", self.client.stat_object, self.bucket, key)
        except S3Error as err:
            if err.code in _MISSING_CODES:
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """Keys below ``prefix`` (recursive, sorted)."""
        if prefix:
            check_key(prefix.rstrip("/"), "prefix")
        self.ensure_bucket()
        objects = self._call(
            "list", self.client.list_objects, self.bucket, prefix=prefix, recursive=True
        )
        return sorted(str(o.object_name) for o in objects if not o.is_dir)

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Objects below ``prefix`` with their size and ETag (recursive, sorted by key)."""
        if prefix:
            check_key(prefix.rstrip("/"), "prefix")
        self.ensure_bucket()

        def listing() -> list[StoredObject]:
            objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return [
                StoredObject(str(o.object_name), int(o.size or 0), str(o.etag or "").strip('"'))
                for o in objects
                if not o.is_dir
            ]

        return sorted(self._call("list", listing), key=lambda o: o.key)

    def download(self, key: str, path: Path) -> tuple[int, str]:
        """Stream the object at ``key`` into the file ``path``; (bytes, hex sha256) written.
        NotFound if missing."""
        check_key(key)
        self.ensure_bucket()
        try:
            response = self._call("get", self.client.get_object, self.bucket, key)
        except S3Error as err:
            if err.code in _MISSING_CODES:
                raise NotFound(f"no object {key!r} in bucket {self.bucket!r}") from None
            raise
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "wb") as out:
                for chunk in response.stream(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except urllib3.exceptions.HTTPError as err:
            raise Unavailable(
                f"S3 at {self.settings.endpoint} failed while sending {key!r}: {err}"
            ) from err
        finally:
            response.close()
            response.release_conn()
        return size, digest.hexdigest()

    def delete(self, keys: Iterable[str]) -> int:
        """Remove the objects at ``keys`` (missing ones are fine); returns how many were asked.
        FailedPrecondition naming the first refusal when the server refuses any (e.g. a policy
        that allows no deletion there)."""
        batch = [DeleteObject(check_key(k)) for k in keys]
        if not batch:
            return 0
        self.ensure_bucket()

        def remove() -> list[Any]:
            # remove_objects is lazy: nothing is sent until its error iterator is consumed.
            return list(self.client.remove_objects(self.bucket, batch))

        errors = self._call("delete", remove)
        if errors:
            first = errors[0]
            raise FailedPrecondition(
                f"S3 refused to delete {len(errors)} of {len(batch)} object(s) in bucket "
                f"{self.bucket!r}; first {first.name!r}: {first.code}: {first.message}"
            )
        return len(batch)

    # -- JSON, JSONL, safetensors -----------------------------------------------------------

    def put_json(self, key: str, value: Any) -> bool:
        """Write a JSON document once (sorted keys, UTF-8)."""
        data = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return self.put_bytes(key, data, "application/json")

    def get_json(self, key: str) -> Any:
        """Parse the JSON document at ``key``."""
        return json.loads(self.get_bytes(key))

    def put_jsonl(self, key: str, rows: Iterable[Mapping[str, Any]]) -> bool:
        """Write rows as JSON Lines once."""
        buf = io.StringIO()
        for row in rows:
            buf.write(json.dumps(row, sort_keys=True, ensure_ascii=False))
            buf.write("\n")
        return self.put_bytes(key, buf.getvalue().encode("utf-8"), "application/x-ndjson")

    def get_jsonl(self, key: str) -> list[Any]:
        """All rows of the JSON Lines object at ``key``."""
        return list(self.iter_jsonl(key))

    def iter_jsonl(self, key: str) -> Iterator[Any]:
        """Rows of the JSON Lines object at ``key`` (blank lines skipped)."""
        for i, line in enumerate(self.get_bytes(key).decode("utf-8").splitlines()):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise InvalidArgument(f"{key}[{i}]", f"bad JSON line: {err}") from None

    def put_safetensors(
        self,
        key: str,
        tensors: Mapping[str, np.ndarray],
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Write tensors with JSON metadata as safetensors once."""
        blob = save_safetensors(tensors, metadata or {})
        return self.put_bytes(key, blob, "application/octet-stream")

    def get_safetensors(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Tensors and raw string metadata stored at ``key``."""
        return load_safetensors(self.get_bytes(key))


class AsyncS3Store:
    """``S3Store`` for coroutines: each call runs in a worker thread."""

    def __init__(self, store: S3Store | None = None) -> None:
        self.sync = store or S3Store()

    @property
    def bucket(self) -> str:
        return self.sync.bucket

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def ensure_bucket(self) -> None:
        await self._run(self.sync.ensure_bucket)

    async def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        return await self._run(self.sync.put_bytes, key, data, content_type)

    async def get_bytes(self, key: str) -> bytes:
        return await self._run(self.sync.get_bytes, key)

    async def exists(self, key: str) -> bool:
        return await self._run(self.sync.exists, key)

    async def list_keys(self, prefix: str) -> list[str]:
        return await self._run(self.sync.list_keys, prefix)

    async def put_json(self, key: str, value: Any) -> bool:
        return await self._run(self.sync.put_json, key, value)

    async def get_json(self, key: str) -> Any:
        return await self._run(self.sync.get_json, key)

    async def put_jsonl(self, key: str, rows: Iterable[Mapping[str, Any]]) -> bool:
        return await self._run(self.sync.put_jsonl, key, list(rows))

    async def get_jsonl(self, key: str) -> list[Any]:
        return await self._run(self.sync.get_jsonl, key)

    async def put_safetensors(
        self,
        key: str,
        tensors: Mapping[str, np.ndarray],
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        return await self._run(self.sync.put_safetensors, key, tensors, metadata)

    async def get_safetensors(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return await self._run(self.sync.get_safetensors, key)
