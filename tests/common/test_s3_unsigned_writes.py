"""Issue 15 item 2: only a signed S3 request changes a stored object on the local stack.

SeaweedFS also listens with its filer, master and volume servers; before, an unsigned
``curl -X PUT http://127.0.0.1:<filer>/buckets/<bucket>/<key>`` overwrote a result and DELETE
removed it. Each such request is sent here to the real server and must be refused, with the
stored object unchanged afterwards.

Their gRPC ports (which S3 itself uses) take only connections with a client certificate of the
stack's own CA.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
import urllib3

from services.common import localstack
from services.common.store import S3Store

http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=5.0), retries=False)


def send(method: str, url: str, body: bytes | None = None) -> int:
    """Status of an unsigned request (0: the connection itself was refused)."""
    try:
        return int(http.request(method, url, body=body).status)
    except urllib3.exceptions.HTTPError:
        return 0


@pytest.fixture
def stored(s3_env: object, s3_server: localstack.S3Server) -> tuple[S3Store, str]:
    store = S3Store()
    key = f"runs/unsigned-{uuid.uuid4().hex[:8]}/result.json"
    store.put_bytes(key, b'{"score": 1}')
    return store, key


@pytest.mark.parametrize("server", ["filer", "master"])
@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
def test_filer_and_master_refuse_unsigned_writes(
    stored: tuple[S3Store, str], s3_server: localstack.S3Server, server: str, method: str
) -> None:
    store, key = stored
    url = f"http://{s3_server.host}:{s3_server.ports[server]}/buckets/{s3_server.bucket}/{key}"
    status = send(method, url, None if method == "DELETE" else b'{"score": 666}')
    assert status == 0 or status >= 400, f"{server} answered {method} with {status}"
    assert store.get_bytes(key) == b'{"score": 1}'


def test_master_cannot_drop_the_bucket_collection(
    stored: tuple[S3Store, str], s3_server: localstack.S3Server
) -> None:
    store, key = stored
    master = f"http://{s3_server.host}:{s3_server.ports['master']}"
    assert send("GET", f"{master}/col/delete?collection={s3_server.bucket}") in (0, 404)
    assert send("GET", f"{master}/dir/assign") in (0, 404)  # no write grants handed out
    assert store.get_bytes(key) == b'{"score": 1}'


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
def test_volume_server_wants_a_jwt(
    stored: tuple[S3Store, str], s3_server: localstack.S3Server, method: str
) -> None:
    store, key = stored
    # The volume server checks the write JWT before it looks the file id up.
    url = f"http://{s3_server.host}:{s3_server.ports['volume']}/3,01637037d6"
    assert send(method, url, None if method == "DELETE" else b"zz") == 401
    assert store.get_bytes(key) == b'{"score": 1}'


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_s3_refuses_unsigned_requests(
    stored: tuple[S3Store, str], s3_server: localstack.S3Server, method: str
) -> None:
    store, key = stored
    url = f"http://{s3_server.endpoint}/{s3_server.bucket}/{key}"
    assert send(method, url, None if method == "DELETE" else b"x") == 403
    assert store.get_bytes(key) == b'{"score": 1}'


def test_signed_writes_still_work(stored: tuple[S3Store, str]) -> None:
    store, key = stored
    big = bytes(range(256)) * (24 * 4096)  # 24 MiB: a multipart upload through the volume JWT
    store.put_bytes(key.replace("result.json", "big.bin"), big)
    assert store.get_bytes(key.replace("result.json", "big.bin")) == big
    assert store.get_bytes(key) == b'{"score": 1}'


def _connects(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=3)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


@pytest.mark.parametrize("port", ["filer_grpc", "master_grpc", "volume_grpc", "s3_grpc"])
def test_grpc_ports_want_a_client_certificate(s3_server: localstack.S3Server, port: str) -> None:
    assert s3_server.tls_dir, "no gRPC certificates were made (is openssl installed?)"
    address = f"{s3_server.host}:{s3_server.ports[port]}"
    ca = (Path(s3_server.tls_dir) / "ca.crt").read_bytes()
    assert not _connects(address, None)  # plaintext
    assert not _connects(address, grpc.ssl_channel_credentials(root_certificates=ca))
    node = Path(s3_server.tls_dir)
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(node / "node.key").read_bytes(),
        certificate_chain=(node / "node.crt").read_bytes(),
    )
    assert _connects(address, with_cert)  # the stack's own certificate is let in
