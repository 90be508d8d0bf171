"""The NATS connection of a qsens process, and the names of the job plane's NATS resources.

``connect()`` reads ``NatsSettings``, authenticates, fails fast with ``Unavailable`` naming the
URL when no server answers, and afterwards reconnects forever (a worker outlives a NATS
restart). ``PlaneNames`` derives every subject, stream and KV bucket from one namespace, so a
test or a second deployment on the same server gets its own plane by changing one setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from services.common import settings as settings_mod
from services.common.errors import FailedPrecondition, Unavailable
from services.common.jobs import JobKind
from services.common.logging import get_logger
from services.common.settings import NatsSettings

__all__ = ["PlaneNames", "connect", "connection", "ensure_kv", "kv_values", "plane_names"]

log = get_logger(__name__)


@dataclass(frozen=True)
class PlaneNames:
    """Subjects, streams, consumers and buckets of one job-plane namespace."""

    namespace: str

    def job_subject(self, kind: JobKind | str) -> str:
        return f"{self.namespace}.jobs.{JobKind(kind).value}"

    def job_stream(self, kind: JobKind | str) -> str:
        return f"{self.namespace.upper()}_JOBS_{JobKind(kind).value.upper()}"

    def consumer(self, kind: JobKind | str) -> str:
        return f"workers-{JobKind(kind).value}"

    def dlq_subject(self, kind: JobKind | str) -> str:
        return f"{self.namespace}.dlq.{JobKind(kind).value}"

    @property
    def dlq_stream(self) -> str:
        return f"{self.namespace.upper()}_DLQ"

    @property
    def dlq_wildcard(self) -> str:
        return f"{self.namespace}.dlq.>"

    @property
    def runs_bucket(self) -> str:
        return f"{self.namespace}-runs"

    @property
    def jobs_bucket(self) -> str:
        return f"{self.namespace}-jobs"

    @property
    def loaders_bucket(self) -> str:
        return f"{self.namespace}-loaders"


def plane_names(settings: NatsSettings | None = None) -> PlaneNames:
    """Names for the configured namespace."""
    cfg = settings or settings_mod.get(NatsSettings)
    return PlaneNames(cfg.namespace)


async def connect(settings: NatsSettings | None = None, *, name: str = "qsens") -> Client:
    """A connected client; ``Unavailable`` if no server accepts us within the connect timeout."""
    cfg = settings or settings_mod.get(NatsSettings)
    servers = [s.strip() for s in cfg.url.split(",") if s.strip()]
    last_error: list[BaseException] = []

    async def on_error(err: Exception) -> None:
        last_error.append(err)
        log.warning("nats error", extra={"error": repr(err)})

    async def on_disconnect() -> None:
        log.info("nats disconnected", extra={"servers": cfg.url})

    async def on_reconnect() -> None:
        log.info("nats reconnected", extra={"servers": cfg.url})

    client = Client()
    try:
        # Reconnect forever once connected; the initial attempt is bounded by wait_for so a
        # wrong URL or password is reported instead of retried silently.
        await asyncio.wait_for(
            client.connect(
                servers=servers,
                name=name,
                user=cfg.user,
                password=cfg.password.get_secret_value() if cfg.password else None,
                connect_timeout=max(1, round(cfg.connect_timeout_s)),
                reconnect_time_wait=max(1, round(cfg.reconnect_wait_s)),
                max_reconnect_attempts=-1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            ),
            timeout=cfg.connect_timeout_s,
        )
    except (TimeoutError, OSError, nats.errors.Error) as err:
        with suppress(Exception):
            await client.close()
        cause = last_error[-1] if last_error else err
        raise Unavailable(
            f"cannot connect to NATS at {cfg.url}: {cause!r} (is the server up? `qsens up` starts one)"
        ) from err
    return client


@asynccontextmanager
async def connection(
    settings: NatsSettings | None = None, *, name: str = "qsens"
) -> AsyncIterator[Client]:
    """``connect()`` as a context manager that drains the connection on exit."""
    client = await connect(settings, name=name)
    try:
        yield client
    finally:
        with suppress(Exception):
            await client.drain()
        with suppress(Exception):
            await client.close()


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    ttl_s: float | None = None,
    history: int = 1,
    replicas: int = 1,
    description: str = "",
) -> KeyValue:
    """Open ``bucket``, creating it when missing (idempotent across concurrent creators)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = api.KeyValueConfig(
        bucket=bucket,
        description=description or None,
        history=history,
        ttl=ttl_s,
        replicas=replicas,
        storage=api.StorageType.FILE,
        # Reads go to the stream leader: a worker must read back what another has just
        # written (compare-and-set would catch a stale read, but only after a wasted round).
        direct=False,
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        # Another process created it first (with our config or an older one): use it.
        return await js.key_value(bucket)


# nats-server's JSMaxSubjectDetails: stream info lists at most this many subjects per page.
_MAX_SUBJECT_DETAILS = 100_000


async def kv_values(kv: KeyValue, pattern: str) -> list[bytes]:
    """Current values of the keys matching ``pattern`` (``*``/``>`` wildcards), deletes skipped.

    A snapshot, not a watch: the server lists the bucket's subjects matching the pattern
    (stream info with a subject filter, so reading one run's jobs does not scan the bucket) and
    the latest value of each is read with a direct get, all requests in flight at once. Values
    come back in the order they were written. A key whose entry expires or is deleted between
    the two steps is left out.

    (nats-py's ``kv.watch`` is not used for this: it signals "no initial values" when the
    server has already pushed the values but the client has not yet processed them, so a
    snapshot read right after a put could come back empty.)
    """
    # KeyValue keeps its stream, subject prefix and JetStream context private; nats-py has
    # no public accessor for any of them.
    js: JetStreamContext = kv._js
    prefix: str = kv._pre
    info = await js.stream_info(kv._stream, subjects_filter=f"{prefix}{pattern}")
    subjects = info.state.subjects or {}
    if len(subjects) >= _MAX_SUBJECT_DETAILS:  # the server pages beyond this; never truncate
        raise FailedPrecondition(
            f"{pattern!r} matches {len(subjects)}+ keys of bucket {kv._name!r}; listings are "
            f"limited to {_MAX_SUBJECT_DETAILS - 1}"
        )
    keys = sorted(subject[len(prefix) :] for subject in subjects)

    async def latest(key: str) -> KeyValue.Entry | None:
        try:
            return await kv.get(key, validate_keys=False)
        except nats.js.errors.KeyNotFoundError:  # deleted, purged or expired meanwhile
            return None

    entries = [entry for entry in await asyncio.gather(*map(latest, keys)) if entry is not None]
    entries.sort(key=lambda entry: entry.revision or 0)
    return [bytes(entry.value) for entry in entries if entry.value]


_shared: dict[str, Client] = {}
_shared_lock: asyncio.Lock | None = None


async def shared_connection(name: str = "qsens-worker") -> Client:
    """One long-lived connection per process and name (workers' judge calls, registries).

    Reconnects are handled by the client; a connection that was closed is replaced.
    """
    global _shared_lock
    if _shared_lock is None:
        _shared_lock = asyncio.Lock()
    async with _shared_lock:
        client = _shared.get(name)
        if client is None or client.is_closed:
            client = await connect(name=name)
            _shared[name] = client
        return client
