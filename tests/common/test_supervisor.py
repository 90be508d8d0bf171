"""The local stack's supervisor on a real stack: it restarts killed children and NATS, records
the restarts, declares its loaders, and a job whose variant has no loader coming fails fast."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import runs as runs_cli
from services.cli import stack as stack_cli
from services.common import localstack
from services.common import settings as settings_mod
from services.common.dag import submit
from services.common.errors import Unavailable
from services.common.jobs import Job, JobKind, RunPlan
from services.common.loader_registry import (
    LoaderEntry,
    LoaderRegistry,
    LoaderStarting,
    NoLoader,
    variant_token,
)
from services.common.localstack import ChildSpec, ProcessInfo, Stack
from services.common.localstack.supervisor import restart_lines
from services.common.natsconn import connection
from tests.common.handlers import behave
from tests.common.plane import open_plane, wait_status, worker

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def current(home: Path, name: str) -> ProcessInfo:
    stack = localstack.load_stack(home)
    assert stack is not None
    return next(p for p in stack.supervised() if p.name == name)


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    for key, value in {
        "QSENS_SUPERVISOR_POLL_S": "0.1",
        "QSENS_SUPERVISOR_BACKOFF_S": "0.2",
        "QSENS_SUPERVISOR_BACKOFF_MAX_S": "1",
        "QSENS_SUPERVISOR_CRASHLOOP_AFTER": "2",
        "QSENS_SUPERVISOR_DECLARE_EVERY_S": "0.3",
        "QSENS_NATS_NAMESPACE": "sup" + uuid.uuid4().hex[:8],
        "QSENS_NATS_UNAVAILABLE_DELAY_S": "0.5",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("QSENS_LOADER_TOKEN", raising=False)
    monkeypatch.delenv("QSENS_LOADER_TOKEN_FILE", raising=False)
    children = [
        ChildSpec(name="loader-sleepy@fp32", argv=SLEEP, variant="sleepy@fp32"),
        ChildSpec(name="loader-crashy@fp32", argv=CRASH, variant="crashy@fp32"),
        ChildSpec(name="worker-sleep", argv=SLEEP),
    ]
    home = tmp_path / "home"
    started = localstack.up(home, children=children)
    for key, value in started.full_env().items():
        monkeypatch.setenv(key, value)
    settings_mod.reset()
    try:
        yield started
    finally:
        outcomes = dict(localstack.down(home, timeout_s=3))
        settings_mod.reset()
        assert outcomes["supervisor"] == "stopped"
        assert not (home / "loader-token").exists()  # a secret: removed by down


def test_restarts_children_and_nats_and_records_them(stack: Stack) -> None:
    home = Path(stack.home)
    assert stack.supervisor is not None and localstack.process_alive(stack.supervisor)
    # The stack made a loader token for its loaders and clients (the loader-guard contract).
    token_file = Path(stack.env["QSENS_LOADER_TOKEN_FILE"])
    assert token_file == home / "loader-token" and oct(token_file.stat().st_mode)[-3:] == "600"
    assert len(token_file.read_text().strip()) >= 40

    sleeper = current(home, "worker-sleep")
    os.kill(sleeper.pid, signal.SIGKILL)
    wait_for("worker restart", lambda: current(home, "worker-sleep").restarts == 1)
    again = current(home, "worker-sleep")
    assert again.pid != sleeper.pid and localstack.process_alive(again)
    assert again.last_exit is not None  # 'gone': up(), not the supervisor, was its parent

    # A killed loader's announcement is withdrawn at once (not left to expire with the TTL),
    # so jobs stop dialling its dead address.
    loader = current(home, "loader-sleepy@fp32")
    asyncio.run(announce_as(loader.pid))
    assert asyncio.run(announced("sleepy@fp32")) == 1
    os.kill(loader.pid, signal.SIGKILL)
    wait_for("withdrawn", lambda: asyncio.run(announced("sleepy@fp32")) == 0, timeout_s=15)

    os.kill(stack.nats.pid, signal.SIGKILL)
    wait_for("nats restart", lambda: current(home, "nats").restarts == 1)

    async def ping() -> bool:
        async with connection(name="test") as nc:  # same port, same generated user
            await nc.flush()
            return nc.is_connected

    wait_for("nats serving", lambda: _try(lambda: asyncio.run(ping())), 20)

    # A child that exits at once is restarted by the supervisor itself, which reads its code.
    wait_for("crash loop", lambda: current(home, "loader-crashy@fp32").restarts >= 3)
    assert current(home, "loader-crashy@fp32").last_exit == "exit code 3"
    lines = restart_lines(localstack.load_stack(home) or stack)
    assert any(line.startswith("worker-sleep") and "1 restart " in line for line in lines)
    # What `qsens status RUN` adds, read from QSENS_HOME (the crashing loader moves on).
    shown_in_status = runs_cli.stack_restarts()
    assert [x for x in shown_in_status if x.startswith("worker-sleep")] == [
        x for x in lines if x.startswith("worker-sleep")
    ]
    assert any(x.startswith("loader-crashy@fp32") for x in shown_in_status)

    shown = CliRunner().invoke(stack_cli.app, ["status-stack", "--home", str(home)])
    assert "restarts" in shown.output and "last exit: exit code 3" in shown.output
    assert "supervisor" in shown.output
    again = CliRunner().invoke(stack_cli.app, ["up", "--home", str(home)])
    assert again.exit_code == 1 and "already running" in again.output
    assert "restarted: worker-sleep" in again.output


async def announce_as(pid: int) -> None:
    """A 'ready' registry entry as the loader process ``pid`` would put it (TTL 30 s)."""
    entry = LoaderEntry(
        variant="sleepy@fp32",
        address="127.0.0.1:1",
        instance="test",
        host=socket.gethostname(),
        pid=pid,
        announced_at=time.time(),
    )
    async with connection(name="test") as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        await registry.kv.put(
            f"{variant_token('sleepy@fp32')}.test", entry.model_dump_json().encode()
        )


async def announced(variant: str) -> int:
    async with connection(name="test") as nc:
        return len(await (await LoaderRegistry.open(nc.jetstream())).entries(variant))


def _try(probe: Callable[[], bool]) -> bool:
    try:
        return probe()
    except Exception:
        return False


def test_no_loader_coming_fails_fast(stack: Stack) -> None:
    async def scenario() -> tuple[str, str, str, str | None, float]:
        async with connection(name="test") as nc:
            registry = await LoaderRegistry.open(nc.jetstream())
            deadline = time.monotonic() + 20
            while True:  # until the supervisor has declared and seen the crash loop
                try:
                    await registry.find("crashy@fp32")
                except NoLoader as err:
                    crashing = str(err)
                    break
                except Unavailable:
                    pass  # not declared yet, or declared as restarting
                assert time.monotonic() < deadline, "no crash-loop declaration"
                await asyncio.sleep(0.2)
            with pytest.raises(LoaderStarting) as starting:
                await registry.find("sleepy@fp32")  # running, not yet announced: coming
            with pytest.raises(NoLoader) as nobody:
                await registry.find("nobody@fp32")
        run_id = "nl-" + uuid.uuid4().hex[:8]
        job = Job(
            kind=JobKind.NOOP, run_id=run_id, params={"do": "loader", "variant": "nobody@fp32"}
        )
        async with open_plane() as plane, worker(behave):
            started = time.monotonic()
            await submit(RunPlan(run_id=run_id, spec_hash="nl", jobs=[job]))
            summary = await wait_status(plane.state, run_id, ["succeeded", "failed"], 30)
            record = (await plane.state.list_jobs(run_id))[0]
            took = time.monotonic() - started
        return (
            crashing,
            str(starting.value),
            str(nobody.value),
            record.error,
            took + (0 if summary.status == "failed" else 1e9),
        )

    crashing, starting, nobody, error, took = asyncio.run(scenario())
    assert "keeps crashing" in crashing and "exit code 3" in crashing
    assert "sleepy@fp32 is running under the supervisor" in starting
    assert "none is coming" in nobody
    assert error is not None and "NoLoader" in error and "none is coming" in error
    assert took < 15  # not an hour of Unavailable retries
