"""Loader discovery: loaders announce ``variant -> address`` in a KV bucket that forgets them.

The bucket ``<namespace>-loaders`` has a max age of ``loader_ttl_s``; an announcing loader
re-puts its entry every third of that, so an entry outlives its loader by at most one TTL and
a crashed loader disappears without anyone cleaning up. Keys are ``<variant token>.<instance>``
(one entry per loader process, so replicas of a variant coexist) and ``find`` picks one of the
live ``ready`` entries at random. A variant with no live loader is ``Unavailable``: workers nak
the job and retry it later instead of failing it.

An entry has a state: ``ready`` (serving at ``address``), or, before that, ``waiting`` (for
its quantized checkpoint: ``detail`` names the quantize job and the checkpoint) and
``starting`` (fetching and loading weights). ``find`` on a variant whose only loaders are
waiting or starting raises ``LoaderStarting``, an ``Unavailable`` the job plane retries
without counting an attempt, since a loader is known to be coming; ``qsens status`` shows
those entries with their ``since`` time.

A local stack's supervisor (``services.common.localstack.supervisor``) also puts one
``supervised.<stack>`` entry listing the loaders it keeps running. A variant without live
loaders is then ``LoaderStarting`` when a supervisor is restarting its loader, and ``NoLoader``
(a ``FailedPrecondition``: the job fails at once, not after an hour of retries) when a
supervisor gave up on it (crash loop) or no supervisor of the namespace runs one for it.
Without any supervisor (a cluster, a hand-started loader) it stays ``Unavailable``.

Routing: a ready entry carries its engine's capabilities (``capabilities_to_json``; an entry
of an older loader has none and counts as able to do anything). ``find(variant, needs)`` picks
only among the ready loaders whose engine covers what the job needs (RPCs, capture segment and
reduction, steering mode and positions; ``services.loader.capabilities.Needs``), so a job a
vLLM loader cannot compute exactly goes to an HF loader of the same variant. When ready
loaders exist but none covers it, a loader still waiting or starting (capabilities not yet
known) makes it ``LoaderStarting``; otherwise the error names what is needed and the engines
that are live: ``NoLoader`` when the local stack's supervisor brings no other loader of it,
``Unavailable`` (retried) without a supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import time
import uuid
from typing import Any, Literal, NoReturn

import nats.js.errors
from google.protobuf import json_format
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from services.common import settings as settings_mod
from services.common.errors import FailedPrecondition, Unavailable
from services.common.logging import get_logger
from services.common.natsconn import PlaneNames, connection, ensure_kv, kv_values
from services.common.settings import NatsSettings
from services.common.variants import Variant
from services.loader.capabilities import (
    EngineCapabilities,
    Needs,
    capabilities_from_json,
    capabilities_to_json,
)

__all__ = [
    "Announcement",
    "LoaderEntry",
    "LoaderRegistry",
    "LoaderStarting",
    "LoaderState",
    "NoLoader",
    "SupervisedLoader",
    "SupervisedLoaders",
    "announce_forever",
    "variant_token",
]

log = get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

LoaderState = Literal["ready", "waiting", "starting"]


class LoaderStarting(Unavailable):
    """The variant's loaders are announced but none is ready yet (waiting for a checkpoint or
    loading): retry later, and do not count it as an attempt."""


class NoLoader(FailedPrecondition):
    """No loader serves the variant and none is coming: its job fails instead of retrying."""


class SupervisedLoader(BaseModel):
    """One loader a local stack's supervisor keeps running."""

    state: Literal["running", "restarting", "crashloop"]
    restarts: int = 0
    detail: str = Field("", description="How it last ended, and its log.")


class SupervisedLoaders(BaseModel):
    """A supervisor's declaration: the loaders it runs, by canonical variant."""

    stack: str = Field(description="The stack's home folder.")
    host: str
    at: float
    loaders: dict[str, SupervisedLoader] = Field(default_factory=dict)


SUPERVISED_PREFIX = "supervised"


def variant_token(variant: str | Variant) -> str:
    """A single KV-key token for a variant: ``smollm2-135m@nf4`` -> ``smollm2-135m=40nf4``."""
    canonical = str(variant if isinstance(variant, Variant) else Variant.parse(variant))
    # '.' separates subject tokens and '@' is not a key character: escape both reversibly.
    return _UNSAFE.sub(lambda m: f"={ord(m.group()):02x}", canonical)


class LoaderEntry(BaseModel):
    """One announced loader."""

    variant: str = Field(description="Canonical variant, model@precision.")
    address: str = Field(description="host:port of its gRPC server ('' before it serves).")
    state: LoaderState = Field("ready", description="ready, or waiting/starting before that.")
    since: float | None = Field(None, description="Unix time the entry entered its state.")
    detail: str = Field("", description="What a waiting/starting loader waits for.")
    instance: str = Field(description="Unique id of the loader process.")
    host: str = Field(description="Hostname of the loader.")
    pid: int = Field(description="Process id of the loader.")
    announced_at: float = Field(description="Unix time of the latest heartbeat.")
    metadata: dict[str, str] = Field(default_factory=dict, description="e.g. http address.")
    capabilities: dict[str, Any] | None = Field(
        None,
        description="Its engine's capabilities (capabilities_to_json); None: not stated (an "
        "older loader, or one not loaded yet), taken as able to do anything.",
    )

    def engine_capabilities(self) -> EngineCapabilities | None:
        """The stated capabilities (None: not stated, or not readable by this version)."""
        if self.capabilities is None:
            return None
        try:
            return capabilities_from_json(self.capabilities)
        except json_format.Error:
            log.warning("unreadable loader capabilities", extra={"instance": self.instance})
            return None

    def covers(self, needs: Needs | None) -> bool:
        """Whether this loader's engine can serve a job that needs ``needs``."""
        caps = self.engine_capabilities()
        return needs is None or caps is None or caps.covers(needs)

    def engine_line(self, needs: Needs | None = None) -> str:
        """``vllm at host:port (lacks capture response:mean)``, for error messages."""
        caps = self.engine_capabilities()
        name = caps.engine if caps is not None else "unstated engine"
        lacks = caps.missing(needs) if caps is not None and needs is not None else Needs()
        return f"{name} at {self.address}" + (f" (lacks {lacks})" if lacks != Needs() else "")


class Announcement:
    """A live announcement; ``stop()`` ends the heartbeat and withdraws the entry."""

    def __init__(self, kv: KeyValue, key: str, entry: LoaderEntry, every_s: float) -> None:
        self.kv = kv
        self.key = key
        self.entry = entry
        self._task = asyncio.create_task(self._beat(every_s), name=f"announce-{key}")

    async def _beat(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            entry = self.entry.model_copy(update={"announced_at": time.time()})
            try:
                await self.kv.put(self.key, entry.model_dump_json().encode())
            except Exception as err:  # NATS down: the next beat tries again
                log.warning("loader heartbeat failed", extra={"key": self.key, "error": repr(err)})

    async def update(
        self, state: LoaderState, detail: str = "", *, address: str | None = None
    ) -> None:
        """Move the entry to ``state`` now (the heartbeat keeps it there)."""
        changes: dict[str, object] = {
            "state": state,
            "detail": detail,
            "since": time.time(),
            "announced_at": time.time(),
        }
        if address is not None:
            changes["address"] = address
        self.entry = self.entry.model_copy(update=changes)
        await self.kv.put(self.key, self.entry.model_dump_json().encode())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(Exception):
            await self.kv.delete(self.key)


class LoaderRegistry:
    """Announce and find loaders in one namespace."""

    def __init__(self, kv: KeyValue, settings: NatsSettings) -> None:
        self.kv = kv
        self.settings = settings

    @classmethod
    async def open(
        cls, js: JetStreamContext, settings: NatsSettings | None = None
    ) -> LoaderRegistry:
        """Open (creating if needed) the loaders bucket with its TTL."""
        cfg = settings or settings_mod.get(NatsSettings)
        kv = await ensure_kv(
            js,
            PlaneNames(cfg.namespace).loaders_bucket,
            ttl_s=cfg.loader_ttl_s,
            replicas=cfg.replicas,
            description="qsens loaders: variant -> address",
        )
        return cls(kv, cfg)

    async def announce(
        self,
        variant: str | Variant,
        address: str,
        *,
        metadata: dict[str, str] | None = None,
        instance: str | None = None,
        state: LoaderState = "ready",
        detail: str = "",
        capabilities: EngineCapabilities | None = None,
    ) -> Announcement:
        """Publish ``variant -> address`` (in ``state``, with its engine's ``capabilities``) now
        and keep it alive until ``stop()``."""
        token = variant_token(variant)
        inst = instance or uuid.uuid4().hex[:12]
        entry = LoaderEntry(
            variant=str(variant if isinstance(variant, Variant) else Variant.parse(variant)),
            address=address,
            instance=inst,
            host=socket.gethostname(),
            pid=os.getpid(),
            announced_at=time.time(),
            metadata=dict(metadata or {}),
            state=state,
            since=time.time(),
            detail=detail,
            capabilities=None if capabilities is None else capabilities_to_json(capabilities),
        )
        key = f"{token}.{inst}"
        await self.kv.put(key, entry.model_dump_json().encode())
        return Announcement(self.kv, key, entry, max(0.2, self.settings.loader_ttl_s / 3))

    async def entries(self, variant: str | Variant) -> list[LoaderEntry]:
        """Live loaders of ``variant``."""
        found: list[LoaderEntry] = []
        for value in await kv_values(self.kv, f"{variant_token(variant)}.*"):
            with contextlib.suppress(ValueError):
                found.append(LoaderEntry.model_validate_json(value))
        return found

    async def all_entries(self) -> list[LoaderEntry]:
        """Every live loader of the namespace, in any state."""
        found: list[LoaderEntry] = []
        for value in await kv_values(self.kv, ">"):
            with contextlib.suppress(ValueError):
                found.append(LoaderEntry.model_validate_json(value))
        return found

    async def declare_supervised(self, stack_id: str, doc: SupervisedLoaders) -> None:
        """Put (refresh) a supervisor's declaration; it expires with the bucket's TTL."""
        await self.kv.put(f"{SUPERVISED_PREFIX}.{stack_id}", doc.model_dump_json().encode())

    async def supervised(self) -> list[SupervisedLoaders]:
        """The live supervisors' declarations."""
        found: list[SupervisedLoaders] = []
        for value in await kv_values(self.kv, f"{SUPERVISED_PREFIX}.*"):
            with contextlib.suppress(ValueError):
                found.append(SupervisedLoaders.model_validate_json(value))
        return found

    async def forget(self, variant: str | Variant, pid: int, host: str) -> int:
        """Delete the entries of a loader process known to be dead; returns how many."""
        gone = [e for e in await self.entries(variant) if e.pid == pid and e.host == host]
        for entry in gone:
            await self.kv.delete(f"{variant_token(variant)}.{entry.instance}")
        return len(gone)

    async def find(self, variant: str | Variant, needs: Needs | None = None) -> str:
        """Address of a live ready loader for ``variant`` whose engine covers ``needs`` (None:
        any); ``LoaderStarting`` when the loaders that could are only waiting or starting,
        ``Unavailable``/``NoLoader`` naming the variant (and ``needs``) when none can."""
        try:
            live = await self.entries(variant)
        except nats.js.errors.Error as err:
            raise Unavailable(
                f"loader registry unreachable while looking for {variant}: {err}"
            ) from err
        ready = [e for e in live if e.state == "ready" and e.address]
        capable = [e for e in ready if e.covers(needs)]
        if capable:
            return random.choice(capable).address
        coming = [e for e in live if e not in ready and e.covers(needs)]
        if coming:
            first = min(coming, key=lambda e: e.since or e.announced_at)
            waited = time.time() - (first.since or first.announced_at)
            raise LoaderStarting(
                f"the loader of {variant} is {first.state} ({waited:.0f} s)"
                + (f": {first.detail}" if first.detail else "")
            )
        if ready and needs is not None:
            await self._none_capable(variant, needs, ready)
        await self._none_coming(variant)
        raise Unavailable(
            f"no loader for variant {variant} is announced "
            f"(start one with `qsens serve loader ... --announce`)"
        )

    async def _none_capable(
        self, variant: str | Variant, needs: Needs, ready: list[LoaderEntry]
    ) -> NoReturn:
        """Ready loaders of ``variant`` exist but none can serve ``needs``: LoaderStarting when
        a supervisor is restarting one of it, NoLoader when the local stack brings none,
        Unavailable (another loader may be started) without a supervisor."""
        name = str(variant if isinstance(variant, Variant) else Variant.parse(variant))
        live = "; ".join(sorted(e.engine_line(needs) for e in ready))
        what = f"no live loader of {name} can serve a job that needs {needs} (live: {live})"
        try:
            declared = await self.supervised()
        except nats.js.errors.Error:
            declared = []
        for doc in declared:
            mine = doc.loaders.get(name)
            if mine is not None and mine.state == "restarting":
                raise LoaderStarting(f"{what}; the supervisor of {doc.stack} is restarting one")
        hint = "start a loader of it on an engine that can (e.g. `qsens serve loader --engine hf`)"
        if declared:
            raise NoLoader(f"{what} and the local stack runs no other; {hint}")
        raise Unavailable(f"{what}; {hint} with --announce")

    async def _none_coming(self, variant: str | Variant) -> None:
        """Raise LoaderStarting/NoLoader from the supervisors' declarations (none: return)."""
        try:
            declared = await self.supervised()
        except nats.js.errors.Error:
            return
        if not declared:
            return
        name = str(variant if isinstance(variant, Variant) else Variant.parse(variant))
        for doc in declared:
            mine = doc.loaders.get(name)
            if mine is None:
                continue
            if mine.state == "crashloop":
                raise NoLoader(
                    f"the loader of {name} keeps crashing ({mine.restarts} restarts by the "
                    f"supervisor of {doc.stack}; {mine.detail}); fix it and `qsens up` again"
                )
            raise LoaderStarting(
                f"the loader of {name} is {mine.state} under the supervisor of {doc.stack} "
                f"({mine.restarts} restarts)"
            )
        stacks = ", ".join(sorted(d.stack for d in declared))
        raise NoLoader(
            f"no loader serves variant {name} and none is coming: the local stack ({stacks}) "
            f"runs none for it; start one with `qsens up --spec` on a spec that includes it"
        )


async def announce_forever(
    variant: str | Variant,
    address: str,
    *,
    metadata: dict[str, str] | None = None,
    capabilities: EngineCapabilities | None = None,
    settings: NatsSettings | None = None,
) -> None:
    """Connect, announce (with the engine's ``capabilities``), and keep the announcement alive
    until cancelled (then withdraw it)."""
    async with connection(settings, name=f"qsens-loader-{variant}") as nc:
        registry = await LoaderRegistry.open(nc.jetstream(), settings)
        announcement = await registry.announce(
            variant, address, metadata=metadata, capabilities=capabilities
        )
        try:
            await asyncio.Event().wait()
        finally:
            await announcement.stop()
