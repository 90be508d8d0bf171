"""Start real loader processes (``qsens serve loader``) for tests and wait until they serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LoaderProc:
    """A running loader subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    metrics_port: int
    variant: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_loader(
    model: str,
    precision: str,
    *,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 240.0,
    http: bool = True,
    metrics: bool = True,
    python: str | None = None,
) -> LoaderProc:
    """Launch ``python -m services.cli.main serve loader`` and wait for its ready file
    (``python``: another environment's interpreter, e.g. the vLLM one; default this one)."""
    workdir = Path(tempfile.mkdtemp(prefix="qsens-loader-"))
    ready = workdir / "ready.json"
    log_path = workdir / "loader.log"
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "QSENS_LOG_LEVEL": "INFO"})
    full_env.update(env or {})
    args = [
        python or sys.executable,
        "-m",
        "services.cli.main",
        "serve",
        "loader",
        "--model",
        model,
        "--precision",
        precision,
        "--device",
        "cpu",
        "--port",
        "0",
        "--http-port",
        "-1" if http else "0",
        "--metrics-port",
        str(_free_port()) if metrics else "0",
        "--ready-file",
        str(ready),
        *(extra_args or []),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"loader exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"loader not ready in {timeout}s:\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.1)
    time.sleep(0.05)
    info = json.loads(ready.read_text())
    return LoaderProc(
        proc,
        info["port"],
        info["http_port"],
        info["metrics_port"],
        info["variant"],
        log_path,
        full_env,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
