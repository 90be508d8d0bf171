"""Keeps a local stack running: restarts any of its processes that dies, with back-off.

``up`` starts it as its own process (``python -m services.common.localstack.supervisor HOME``),
as Kubernetes restarts a pod's containers. Every ``poll_s`` it checks NATS, S3 and each child
recorded in ``HOME/stack.json``; a dead one is started again with the same command, after
``backoff_s`` doubling per quick death (one that ran less than ``stable_s``) up to
``backoff_max_s``. A process that died ``crashloop_after`` times in a row quickly is
*crash-looping*: still restarted at the longest back-off, but declared as such. Restarts and
the last exit are recorded in stack.json, where ``qsens status-stack`` and ``qsens status``
read them.

Through NATS (when it is up) the supervisor also tells the job plane about loaders: it
declares the variants it keeps a loader running for (``LoaderRegistry.declare_supervised``),
so a job whose variant has no loader fails at once (``NoLoader``) instead of retrying for an
hour, and it withdraws a dead loader's announcement so jobs stop trying its address.

SIGTERM or SIGINT stops the supervisor only; ``down`` stops it first, then the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.errors import FailedPrecondition
from services.common.localstack.process import (
    ProcessInfo,
    exit_status,
    process_alive,
    start_child,
    stop_process,
)
from services.common.localstack.s3 import remove_weed_sockets
from services.common.localstack.state import Stack, load_stack, save_stack
from services.common.logging import get_logger

__all__ = ["Supervisor", "SupervisorSettings", "main", "restart_lines"]

log = get_logger(__name__)

SupervisedState = Literal["running", "restarting", "crashloop"]


class SupervisorSettings(BaseSettings):
    """Restart policy (environment ``QSENS_SUPERVISOR_*``)."""

    model_config = SettingsConfigDict(env_prefix="QSENS_SUPERVISOR_", extra="ignore")

    poll_s: float = Field(0.5, gt=0, le=60, description="How often processes are checked.")
    backoff_s: float = Field(1.0, ge=0, le=600, description="Delay before the first restart.")
    backoff_max_s: float = Field(60.0, ge=0, le=3600, description="Longest delay; doubles to it.")
    stable_s: float = Field(60.0, gt=0, description="Uptime after which a death is not 'quick'.")
    crashloop_after: int = Field(5, ge=1, description="Quick deaths in a row = crash loop.")
    declare_every_s: float = Field(5.0, gt=0, le=60, description="Declaration refresh period.")


@dataclass
class _Watch:
    started_at: float  # monotonic time of the latest (re)start
    quick_deaths: int = 0  # in a row
    due: float | None = None  # when the pending restart is due


@dataclass
class Supervisor:
    """The restart loop's state; ``check`` is one pass (pure of NATS, easy to test)."""

    home: Path
    settings: SupervisorSettings = field(default_factory=SupervisorSettings)
    stack: Stack = field(init=False)
    watch: dict[str, _Watch] = field(init=False)
    dead_loaders: list[tuple[str, int]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        stack = load_stack(self.home)
        if stack is None:
            raise FailedPrecondition(f"no stack recorded in {self.home}: nothing to supervise")
        self.stack = stack
        now = time.monotonic()
        self.watch = {p.name: _Watch(started_at=now) for p in stack.supervised()}

    def delay(self, quick_deaths: int) -> float:
        cfg = self.settings
        return float(min(cfg.backoff_max_s, cfg.backoff_s * 2 ** max(0, quick_deaths - 1)))

    def check(self, now: float | None = None) -> bool:
        """Notice deaths and run due restarts; returns whether stack.json changed."""
        now = time.monotonic() if now is None else now
        changed = False
        for info in self.stack.supervised():
            watch = self.watch.setdefault(info.name, _Watch(started_at=now))
            if watch.due is None:
                if process_alive(info):
                    continue
                self._died(info, watch, now)
                changed = True
            if watch.due is not None and now >= watch.due:
                self._restart(info, watch, now)
                changed = True
        if changed:
            save_stack(self.stack)
        return changed

    def _died(self, info: ProcessInfo, watch: _Watch, now: float) -> None:
        quick = now - watch.started_at < self.settings.stable_s
        watch.quick_deaths = watch.quick_deaths + 1 if quick else 1
        watch.due = now + self.delay(watch.quick_deaths)
        how = exit_status(info)
        stop_process(info, timeout_s=0)  # reaps it when it was ours
        self.stack.replace(info.model_copy(update={"last_exit": how}))
        if info.variant:
            self.dead_loaders.append((info.variant, info.pid))
        log.warning(
            "process died; restarting after back-off",
            extra={
                "process_name": info.name,
                "pid": info.pid,
                "exit": how,
                "delay_s": round(watch.due - now, 2),
                "quick_deaths": watch.quick_deaths,
            },
        )

    def _restart(self, info: ProcessInfo, watch: _Watch, now: float) -> None:
        current = next(p for p in self.stack.supervised() if p.name == info.name)
        if current.name == self.stack.s3.name:
            remove_weed_sockets(self.stack.s3_ports.values())  # weed refuses to start over them
        try:
            new = start_child(current.child_spec(), Path(current.log).parent, os.environ)
        except FailedPrecondition as err:
            watch.quick_deaths += 1
            watch.due = now + self.delay(watch.quick_deaths)
            log.error("restart failed", extra={"process_name": info.name, "error": str(err)})
            return
        self.stack.replace(
            new.model_copy(
                update={"restarts": current.restarts + 1, "last_exit": current.last_exit}
            )
        )
        watch.due = None
        watch.started_at = now
        log.info(
            "process restarted",
            extra={"process_name": info.name, "pid": new.pid, "restarts": current.restarts + 1},
        )

    def loader_states(
        self, now: float | None = None
    ) -> dict[str, tuple[SupervisedState, int, str]]:
        """variant -> (running|restarting|crashloop, restarts, detail) of supervised loaders."""
        now = time.monotonic() if now is None else now
        out: dict[str, tuple[SupervisedState, int, str]] = {}
        for info in self.stack.children:
            if not info.variant:
                continue
            watch = self.watch.get(info.name) or _Watch(started_at=now)
            # Crash-looping until it has run stable_s again, even between its restarts.
            looping = watch.quick_deaths >= self.settings.crashloop_after and (
                watch.due is not None or now - watch.started_at < self.settings.stable_s
            )
            state: SupervisedState = (
                "crashloop" if looping else "restarting" if watch.due is not None else "running"
            )
            detail = f"last exit: {info.last_exit}; log {info.log}" if info.last_exit else ""
            out[info.variant] = (state, info.restarts, detail)
        return out


def restart_lines(stack: Stack) -> list[str]:
    """One line per restarted process: ``loader-x@fp32  2 restarts (last: signal SIGKILL)``."""
    return [
        f"{p.name:<28} {p.restarts} restart{'s' if p.restarts != 1 else ''} "
        f"(last exit: {p.last_exit or 'unknown'})"
        for p in stack.supervised()
        if p.restarts or p.last_exit
    ]


async def _declare(sup: Supervisor, stop: asyncio.Event) -> None:
    """Keep the supervised loaders declared in the registry; withdraw dead loaders' entries."""
    from services.common.loader_registry import LoaderRegistry, SupervisedLoader, SupervisedLoaders
    from services.common.natsconn import connect
    from services.common.variants import Variant

    stack_id = hashlib.sha256(str(sup.home).encode()).hexdigest()[:16]
    host = socket.gethostname()
    while not stop.is_set():
        try:
            nc = await connect(name="qsens-supervisor")
        except Exception as err:  # NATS down (perhaps being restarted by us): try again
            log.info("supervisor waits for NATS", extra={"error": str(err)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), sup.settings.declare_every_s)
            continue
        try:
            registry = await LoaderRegistry.open(nc.jetstream())
            while not stop.is_set():
                while sup.dead_loaders:
                    variant, pid = sup.dead_loaders[0]
                    await registry.forget(variant, pid, host)
                    sup.dead_loaders.pop(0)
                loaders = {
                    str(Variant.parse(v)): SupervisedLoader(state=s, restarts=n, detail=d)
                    for v, (s, n, d) in sup.loader_states().items()
                }
                doc = SupervisedLoaders(
                    stack=str(sup.home), host=host, at=time.time(), loaders=loaders
                )
                await registry.declare_supervised(stack_id, doc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), sup.settings.declare_every_s)
        except Exception as err:  # a NATS restart mid-way: reconnect and go on
            log.warning("supervisor declaration failed", extra={"error": repr(err)})
        finally:
            with contextlib.suppress(Exception):
                await nc.close()


async def supervise(home: Path, settings: SupervisorSettings | None = None) -> None:
    """Run the restart loop until SIGTERM/SIGINT."""
    sup = Supervisor(home.resolve(), settings or SupervisorSettings())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    declaring = asyncio.create_task(_declare(sup, stop))
    log.info("supervising", extra={"home": str(sup.home), "processes": len(sup.watch)})
    while not stop.is_set():
        sup.check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), sup.settings.poll_s)
    declaring.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await declaring


def main(argv: list[str] | None = None) -> None:
    """``python -m services.common.localstack.supervisor HOME``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m services.common.localstack.supervisor HOME")
    asyncio.run(supervise(Path(args[0])))


if __name__ == "__main__":
    main()
