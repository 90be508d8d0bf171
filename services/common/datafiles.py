"""Data files a spec names by location: a local path (laptop) or ``s3://bucket/key`` (cluster).

A cluster's workers read no files from the machine that submitted the study, so data there
lives in S3. ``put_data`` uploads a file or a folder under a content-addressed key,
``data/<sha256-prefix>/<name>`` (what ``qsens data put`` prints), and ``local_copy`` brings an
``s3://`` location back as a local path for the readers, through a cache folder keyed by
content (``<cache_dir>/data/<sha256-prefix>/<name>``). A key that carries its digest is served
from the cache without a request and is checked against its content when downloaded; any other
key is downloaded each time (it may have been written by anyone) and cached by its content.

A location that is a folder (the ``caa:`` and ``arditi:`` readers read folders) is every object
below ``<key>/``; its digest covers each file's relative name and bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from services.common import settings as settings_mod
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import CommonSettings, S3Settings
from services.common.store import S3Store, check_key

__all__ = [
    "DIGEST_CHARS",
    "S3_SCHEME",
    "data_key",
    "digest_files",
    "is_loopback_endpoint",
    "is_s3",
    "local_copy",
    "parse_s3",
    "put_data",
    "resolve_location",
]

S3_SCHEME = "s3://"
#: Hex characters of the sha256 kept in keys and cache folders (64 bits).
DIGEST_CHARS = 16
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DIGEST_KEY = re.compile(rf"^data/(?P<digest>[0-9a-f]{{{DIGEST_CHARS}}})/(?P<name>.+)$")


def is_s3(location: str) -> bool:
    """Whether ``location`` is an ``s3://`` URI (rather than a local path)."""
    return location.strip().lower().startswith(S3_SCHEME)


def parse_s3(uri: str, field: str = "path") -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; a trailing '/' (a folder) is dropped."""
    rest = uri.strip()[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise InvalidArgument(field, f"{uri!r}: bad bucket name {bucket!r} (s3://bucket/key)")
    key = key.rstrip("/")
    if not key:
        raise InvalidArgument(field, f"{uri!r} names no key after the bucket (s3://bucket/key)")
    return bucket, check_key(key, field)


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether an S3 ``host:port`` is on this machine (a laptop stack, not a cluster)."""
    host = endpoint.strip()
    if host.startswith("["):  # [::1]:8333
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest_files(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 of (relative name, bytes) pairs in name order, as ``DIGEST_CHARS`` hex digits.
    One file's digest is that of its bytes alone, so ``sha256sum`` gives the same prefix."""
    items = sorted(files)
    if len(items) == 1 and items[0][0] == "":
        return hashlib.sha256(items[0][1]).hexdigest()[:DIGEST_CHARS]
    h = hashlib.sha256()
    for name, data in items:
        # Length-prefixed, so no two different folders hash the same stream.
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:DIGEST_CHARS]


def data_key(digest: str, name: str) -> str:
    """The content-addressed key of an upload: ``data/<digest>/<name>``."""
    return check_key(f"data/{digest}/{name}", "key")


def _store(bucket: str | None = None, store: S3Store | None = None) -> S3Store:
    if store is not None and (bucket is None or bucket == store.bucket):
        return store
    base = store.settings if store is not None else settings_mod.get(S3Settings)
    return S3Store(base if bucket is None else base.model_copy(update={"bucket": bucket}))


def _cache_root() -> Path:
    return settings_mod.get(CommonSettings).cache_dir.expanduser() / "data"


def _read_local(path: Path, field: str) -> tuple[str, list[tuple[str, bytes]]]:
    """The name and files of a local file or folder (relative names; '' for one file)."""
    if path.is_file():
        return path.name, [("", path.read_bytes())]
    if path.is_dir():
        files = [
            (p.relative_to(path).as_posix(), p.read_bytes())
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise InvalidArgument(field, f"{path} holds no files")
        return path.name, files
    raise InvalidArgument(field, f"{path} is not a readable file or folder")


def put_data(
    path: str | Path, *, key: str | None = None, store: S3Store | None = None, field: str = "FILE"
) -> str:
    """Upload a local file or folder; returns its ``s3://bucket/key``.

    Default key ``data/<sha256-prefix>/<name>``: the same content always gets the same key, so
    uploading twice is harmless. A given ``key`` that already holds other bytes is refused
    (objects are written once)."""
    local = Path(path).expanduser()
    name, files = _read_local(local, field)
    digest = digest_files(files)
    base = check_key(key.strip("/"), "--key") if key else data_key(digest, name)
    target = _store(store=store)
    target.ensure_bucket()
    for rel, data in files:
        object_key = f"{base}/{rel}" if rel else base
        if not target.put_bytes(object_key, data) and target.get_bytes(object_key) != data:
            raise FailedPrecondition(
                f"s3://{target.bucket}/{object_key} already holds other content; objects are "
                "written once, so choose another --key"
            )
    return f"{S3_SCHEME}{target.bucket}/{base}"


def _install(files: list[tuple[str, bytes]], final: Path) -> Path:
    """Write ``files`` to ``final`` (a file, or a folder when the names are relative paths)
    through a temporary sibling and one rename, so a reader never sees half a copy."""
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))
    try:
        staged = scratch / final.name
        for rel, data in files:
            out = staged / rel if rel else staged
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        try:
            os.rename(staged, final)
        except OSError:
            if not final.exists():  # another process won the race: its copy is the same
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def local_copy(uri: str, *, field: str = "path", store: S3Store | None = None) -> Path:
    """A local path holding the file or folder at ``s3://bucket/key`` (cached by content)."""
    bucket, key = parse_s3(uri, field)
    name = key.rsplit("/", 1)[-1]
    addressed = _DIGEST_KEY.match(key)
    if addressed:
        cached = _cache_root() / addressed["digest"] / addressed["name"]
        if cached.exists():
            return cached
    source = _store(bucket, store)
    try:
        files = [("", source.get_bytes(key))]
    except NotFound:
        below = source.list_keys(key + "/")
        if not below:
            raise InvalidArgument(
                field, f"{uri}: no such object or folder in S3 (upload it with `qsens data put`)"
            ) from None
        files = [(k[len(key) + 1 :], source.get_bytes(k)) for k in below]
    digest = digest_files(files)
    # data/<digest>/<name>/<file> is one file of an uploaded folder: the digest is the folder's.
    whole = addressed is not None and "/" not in addressed["name"]
    if whole and addressed is not None and addressed["digest"] != digest:
        raise InvalidArgument(
            field,
            f"{uri}: its content has sha256 prefix {digest}, not the {addressed['digest']} its "
            "key names (the object was replaced or written by hand)",
        )
    final = _cache_root() / digest / name
    return final if final.exists() else _install(files, final)


def resolve_location(location: str, field: str = "path") -> Path:
    """The local path of a data location: an ``s3://`` URI (downloaded) or a local path."""
    if is_s3(location):
        return local_copy(location, field=field)
    return Path(location).expanduser()
