"""Stack state and lifecycle: ``up`` starts NATS, S3 and the children, ``down`` stops them.

``stack.json`` under the home folder records what ``up`` started (see the package docstring
for the layout); secrets live in ``credentials.env`` and the servers' config files, which
``down`` removes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from services.common.errors import FailedPrecondition
from services.common.localstack.nats import NATS_BINARY, start_nats
from services.common.localstack.process import (
    ChildSpec,
    ProcessInfo,
    file_probe,
    find_binary,
    process_alive,
    start_child,
    stop_process,
    wait_ready,
    write_secret,
)
from services.common.localstack.s3 import (
    DEFAULT_BUCKET,
    WEED_BINARY,
    remove_weed_sockets,
    start_seaweedfs,
)
from services.common.logging import get_logger

log = get_logger(__name__)

STACK_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.env"
LOADER_TOKEN_FILE = "loader-token"


class Stack(BaseModel):
    """stack.json: what ``up`` started. Secrets are in ``credentials_file``, not here."""

    version: int = 1
    home: str
    created_at: float = Field(default_factory=time.time)
    nats: ProcessInfo
    nats_port: int
    s3: ProcessInfo
    s3_ports: dict[str, int]
    children: list[ProcessInfo] = Field(default_factory=list)
    supervisor: ProcessInfo | None = Field(None, description="Restarts the others when they die.")
    credentials_file: str
    env: dict[str, str] = Field(description="Non-secret QSENS_* exports.")
    secret_files: list[str] = Field(default_factory=list, description="Removed by down().")

    def processes(self) -> list[ProcessInfo]:
        """The supervisor, children, then the servers: the order to stop them in."""
        first = [self.supervisor] if self.supervisor is not None else []
        return [*first, *self.children, self.s3, self.nats]

    def supervised(self) -> list[ProcessInfo]:
        """What the supervisor restarts, servers first (the children need them)."""
        return [self.nats, self.s3, *self.children]

    def replace(self, info: ProcessInfo) -> None:
        """Record ``info`` in place of the process of the same name."""
        if info.name == self.nats.name:
            self.nats = info
        elif info.name == self.s3.name:
            self.s3 = info
        else:
            self.children = [info if c.name == info.name else c for c in self.children]

    def full_env(self) -> dict[str, str]:
        """The exports including the credentials (read from the credentials file)."""
        env = dict(self.env)
        with contextlib.suppress(OSError):
            for line in Path(self.credentials_file).read_text().splitlines():
                key, sep, value = line.partition("=")
                if sep and key.startswith("QSENS_"):
                    env[key] = shlex.split(value)[0] if value else ""
        return env

    def export_lines(self) -> list[str]:
        """``export K=V`` lines for a shell (``eval "$(qsens env)"``)."""
        return [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.full_env().items())]


def _stack_path(home: Path) -> Path:
    return home / STACK_FILE


def load_stack(home: Path) -> Stack | None:
    """The stack recorded under ``home``, or None."""
    path = _stack_path(home)
    if not path.exists():
        return None
    try:
        return Stack.model_validate_json(path.read_text())
    except ValueError as err:
        raise FailedPrecondition(
            f"{path} is unreadable ({err}); remove it, or run `qsens down --force`"
        ) from None


def status(home: Path) -> list[tuple[ProcessInfo, bool]]:
    """Each recorded process with whether it is alive (empty when no stack is recorded)."""
    stack = load_stack(home)
    if stack is None:
        return []
    return [(info, process_alive(info)) for info in stack.processes()]


def _check_not_running(home: Path, force: bool) -> None:
    stack = load_stack(home)
    if stack is None:
        return
    alive = [(p, process_alive(p)) for p in stack.processes()]
    # A live supervisor restarts what is gone: the stack is running, not stale.
    supervised = stack.supervisor is not None and process_alive(stack.supervisor)
    if supervised or all(ok for _, ok in alive):
        raise FailedPrecondition(
            f"a stack is already running from {home} (NATS {stack.env.get('QSENS_NATS_URL')}, "
            f"S3 {stack.env.get('QSENS_S3_ENDPOINT')}); `qsens down` stops it"
        )
    gone = ", ".join(f"{p.name} (pid {p.pid})" for p, ok in alive if not ok)
    if not force:
        raise FailedPrecondition(
            f"stale stack state in {home}: {gone} no longer running. Run `qsens down "
            f"--home {home}` to stop the rest and clean up, or `qsens up --force`"
        )
    log.warning("cleaning up a stale stack", extra={"home": str(home), "gone": gone})
    down(home, timeout_s=5.0)


def up(
    home: Path,
    *,
    nats_port: int = 0,
    s3_port: int = 0,
    bucket: str = DEFAULT_BUCKET,
    children: Iterable[ChildSpec] = (),
    force: bool = False,
    bin_dir: Path | None = None,
    supervise: bool = True,
) -> Stack:
    """Start NATS, S3 and ``children`` under ``home``; returns the recorded stack.

    With ``supervise``, a supervisor process (``localstack.supervisor``) then restarts any of
    them that dies, with back-off, until ``down``.
    """
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    _check_not_running(home, force)
    # Find both binaries before starting anything, so a missing one leaves nothing running.
    find_binary(*NATS_BINARY, bin_dir=bin_dir)
    find_binary(*WEED_BINARY, bin_dir=bin_dir)
    started: list[ProcessInfo] = []
    try:
        nats_server = start_nats(home, port=nats_port, bin_dir=bin_dir)
        started.append(nats_server.process)
        s3_server = start_seaweedfs(home, port=s3_port, bucket=bucket, bin_dir=bin_dir)
        started.append(s3_server.process)
        credentials = home / CREDENTIALS_FILE
        secret_env = {
            "QSENS_NATS_PASSWORD": nats_server.password,
            "QSENS_S3_ACCESS_KEY": s3_server.access_key,
            "QSENS_S3_SECRET_KEY": s3_server.secret_key,
        }
        write_secret(credentials, "".join(f"{k}={shlex.quote(v)}\n" for k, v in secret_env.items()))
        public_env = {
            "QSENS_HOME": str(home),
            "QSENS_NATS_URL": nats_server.url,
            "QSENS_NATS_USER": nats_server.user,
            "QSENS_S3_ENDPOINT": s3_server.endpoint,
            "QSENS_S3_BUCKET": s3_server.bucket,
            "QSENS_S3_SECURE": "false",
            **_loader_token(home),
        }
        stack = Stack(
            home=str(home),
            nats=nats_server.process,
            nats_port=nats_server.port,
            s3=s3_server.process,
            s3_ports=s3_server.ports,
            credentials_file=str(credentials),
            env=public_env,
            secret_files=[
                str(credentials),
                nats_server.config_path,
                s3_server.config_path,
                s3_server.security_path,
                *([f"{s3_server.tls_dir}/node.key"] if s3_server.tls_dir else []),
                *([str(home / LOADER_TOKEN_FILE)] if (home / LOADER_TOKEN_FILE).exists() else []),
            ],
        )
        _save(stack)
        child_env = {**os.environ, **public_env, **secret_env}
        _start_children(stack, children, child_env)
        if supervise:
            _start_supervisor(stack, child_env)
        return stack
    except BaseException:
        if _stack_path(home).exists():
            down(home, timeout_s=5.0)
        else:
            for info in reversed(started):
                stop_process(info, timeout_s=5.0)
        raise


def _loader_token(home: Path) -> dict[str, str]:
    """A fresh loader token in ``home/loader-token`` (0600) for the stack's loaders and their
    clients, named by QSENS_LOADER_TOKEN_FILE; nothing when the caller has set a token."""
    from services.common import auth

    (home / LOADER_TOKEN_FILE).unlink(missing_ok=True)
    if os.environ.get(auth.TOKEN_ENV) or os.environ.get(auth.TOKEN_FILE_ENV):
        return {}
    write_secret(home / LOADER_TOKEN_FILE, auth.new_token() + "\n")
    return {auth.TOKEN_FILE_ENV: str(home / LOADER_TOKEN_FILE)}


def _start_children(stack: Stack, children: Iterable[ChildSpec], env: dict[str, str]) -> None:
    """Start ``children`` in order, each after the previous ones are ready; loaders (children
    with a variant) next to each other start together, as they depend on nothing but S3."""
    waiting: list[tuple[ProcessInfo, str, float]] = []

    def wait_all() -> None:
        for info, ready_file, timeout_s in waiting:
            wait_ready(info, f"child {info.name}", file_probe(ready_file), timeout_s)
        waiting.clear()

    for spec in children:
        if spec.variant is None:
            wait_all()
        info = start_child(spec, Path(stack.home) / "logs", env)
        stack.children.append(info)
        _save(stack)
        if spec.ready_file:
            waiting.append((info, spec.ready_file, spec.ready_timeout_s))
            if spec.variant is None:
                wait_all()
    wait_all()


def _start_supervisor(stack: Stack, env: dict[str, str]) -> None:
    stack.supervisor = start_child(
        ChildSpec(
            name="supervisor",
            argv=[sys.executable, "-m", "services.common.localstack.supervisor", stack.home],
            stop_timeout_s=10.0,
        ),
        Path(stack.home) / "logs",
        env,
    )
    _save(stack)


def save_stack(stack: Stack) -> None:
    """Write stack.json atomically (readers never see it half-written)."""
    _save(stack)


def _save(stack: Stack) -> None:
    path = _stack_path(Path(stack.home))
    tmp = path.with_suffix(".tmp")
    write_secret(tmp, stack.model_dump_json(indent=2))
    os.replace(tmp, path)


def down(home: Path, *, timeout_s: float | None = None) -> list[tuple[str, str]]:
    """Stop everything recorded under ``home``; returns (name, outcome) pairs.

    Children stop first, then S3 and NATS in parallel. ``timeout_s`` overrides each
    process's own grace period before SIGKILL.
    """
    home = home.resolve()
    stack = load_stack(home)
    if stack is None:
        return []
    outcomes: list[tuple[str, str]] = []
    if stack.supervisor is not None:
        # First, so nothing is restarted while it stops; then re-read what it recorded.
        outcomes.append((stack.supervisor.name, stop_process(stack.supervisor, timeout_s)))
        stack = load_stack(home) or stack
    for info in stack.children:
        outcomes.append((info.name, stop_process(info, timeout_s)))
    results: dict[str, str] = {}

    def stop(info: ProcessInfo) -> None:
        results[info.name] = stop_process(info, timeout_s)

    threads = [threading.Thread(target=stop, args=(p,)) for p in (stack.s3, stack.nats)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcomes += [(stack.s3.name, results[stack.s3.name]), (stack.nats.name, results["nats"])]
    remove_weed_sockets(stack.s3_ports.values())
    for secret in stack.secret_files:
        with contextlib.suppress(OSError):
            os.remove(secret)
    _stack_path(home).unlink(missing_ok=True)
    return outcomes
