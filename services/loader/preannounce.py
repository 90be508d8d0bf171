"""A loader's registry entry before it serves: ``waiting`` for its checkpoint, then ``starting``.

Between ``qsens serve loader --announce`` starting and its gRPC server answering, the process
waits for a quantize job's checkpoint (``--quantize``) and loads weights, both on the main
thread and both possibly long. ``PreAnnouncer`` keeps an entry in the loader registry during
that time from a thread of its own (its own event loop and NATS connection), so
``qsens status`` can say what the loader is waiting for and since when, and workers retry the
variant's jobs without spending attempts (``LoaderStarting``). The entry is withdrawn once the
same process's ``ready`` entry is in the registry (so the variant never looks loader-less in
between), or when the loader gives up. A registry that cannot be reached only costs the
status line: the loader goes on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import cast

from services.common.loader_registry import LoaderRegistry, LoaderState
from services.common.logging import get_logger
from services.common.natsconn import connection
from services.common.settings import NatsSettings
from services.common.variants import Variant

__all__ = ["PreAnnouncer"]

log = get_logger(__name__)

_STATES = ("waiting", "starting")


class PreAnnouncer:
    """Announce ``variant`` as waiting/starting until this process announces it ready."""

    def __init__(
        self,
        variant: str,
        state: LoaderState,
        detail: str = "",
        *,
        settings: NatsSettings | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.variant = str(Variant.parse(variant))
        self._want: tuple[LoaderState, str] = (state, detail)
        self._settings = settings
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="preannounce", daemon=True)

    def start(self) -> PreAnnouncer:
        self._thread.start()
        return self

    def set_state(self, state: str, detail: str = "") -> None:
        """Move the entry to ``state``, ``waiting`` or ``starting`` (picked up within
        ``poll_s``)."""
        if state not in _STATES:
            raise ValueError(f"a loader is announced waiting or starting, not {state!r}")
        self._want = (cast(LoaderState, state), detail)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Withdraw the entry now (the loader gave up or stops)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as err:  # the registry is a status aid here; serving goes on
            log.warning(
                "could not announce the loader before it serves",
                extra={"variant": self.variant, "error": repr(err)},
            )

    async def _ready_here(self, registry: LoaderRegistry) -> bool:
        host, pid = socket.gethostname(), os.getpid()
        entries = await registry.entries(self.variant)
        return any(e.state == "ready" and e.pid == pid and e.host == host for e in entries)

    async def _run(self) -> None:
        async with connection(self._settings, name=f"qsens-loader-pre-{self.variant}") as nc:
            registry = await LoaderRegistry.open(nc.jetstream(), self._settings)
            shown = self._want
            announcement = await registry.announce(
                self.variant, "", state=shown[0], detail=shown[1]
            )
            log.info(
                "loader announced before serving",
                extra={"variant": self.variant, "state": shown[0], "detail": shown[1]},
            )
            try:
                while not self._stop.is_set():
                    if self._want != shown:
                        shown = self._want
                        await announcement.update(*shown)
                    if await self._ready_here(registry):
                        break
                    await asyncio.sleep(self._poll_s)
            finally:
                await announcement.stop()
