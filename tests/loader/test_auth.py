"""The loader token and TLS: real loaders on loopback refuse calls without the token, serve
calls with it, keep health probes open, and speak gRPC + HTTPS with a self-signed cert."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth
from services.common.errors import FailedPrecondition, Unauthenticated
from services.loader.client import LoaderClient, PromptItem
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from tests.loader_procs import LoaderProc, start_loader

TOKEN = "s3cret-token-for-tests"
AUTH_ENV = (auth.TOKEN_ENV, auth.TOKEN_FILE_ENV, auth.CERT_ENV, auth.KEY_ENV, auth.CA_ENV)


@pytest.fixture
def no_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def token_loader() -> Iterator[LoaderProc]:
    proc = start_loader("tiny:llama", "fp32", env={auth.TOKEN_ENV: TOKEN}, metrics=False)
    yield proc
    proc.stop()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_loader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoaderProc, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(folder)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")  # a mounted Secret often ends with a newline
    env = {auth.TOKEN_FILE_ENV: str(token_file), auth.CERT_ENV: str(cert), auth.KEY_ENV: str(key)}
    proc = start_loader("tiny:llama", "fp32", env=env, metrics=False)
    yield proc, cert
    proc.stop()


async def _info_code(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.LoaderServiceStub(channel).Info(
                pb.InfoRequest(), metadata=metadata, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_grpc_requires_the_token(token_loader: LoaderProc) -> None:
    address = token_loader.address
    assert await _info_code(address, ()) == grpc.StatusCode.UNAUTHENTICATED
    assert await _info_code(address, auth.auth_metadata("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        await _info_code(address, (("authorization", f"Basic {TOKEN}"),))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert await _info_code(address, auth.auth_metadata(TOKEN)) == grpc.StatusCode.OK
    # Health stays open: probes carry no token.
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unauthenticated_call_names_the_fix(
    token_loader: LoaderProc, no_auth_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LoaderClient(token_loader.address, wait_s=5) as client:
        with pytest.raises(Unauthenticated, match="QSENS_LOADER_TOKEN"):
            await client.info()
    monkeypatch.setenv(auth.TOKEN_ENV, "wrong")
    async with LoaderClient(token_loader.address, wait_s=5) as client:
        with pytest.raises(Unauthenticated):
            await client.generate([PromptItem("hi")], max_new_tokens=2)


async def test_client_sends_the_token_from_the_environment(
    token_loader: LoaderProc, no_auth_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    async with LoaderClient(token_loader.address, expect_variant=token_loader.variant) as client:
        await client.wait_ready(30)
        info = await client.info()
        out = await client.generate([PromptItem("hi")], max_new_tokens=3)
        captured = await client.capture([PromptItem("hi")], position="prompt[-1]", layers=[0])
    assert info.variant == token_loader.variant
    assert len(out[0].token_ids) == 3
    assert captured.stacked().shape == (1, 1, info.hidden_size)


def test_http_requires_the_token(token_loader: LoaderProc) -> None:
    base = f"http://127.0.0.1:{token_loader.http_port}"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 401
        wrong = http.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401
        for probe in ("/health", "/healthz", "/readyz"):
            assert http.get(probe).status_code == 200, probe
        headers = {"Authorization": f"Bearer {TOKEN}"}
        ok = http.post("/v1/chat/completions", json=body, headers=headers)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 2
        assert http.get("/v1/models", headers=headers).json()["data"][0]["id"] == (
            token_loader.variant
        )


async def test_tls_end_to_end(
    tls_loader: tuple[LoaderProc, Path], no_auth_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, cert = tls_loader
    # Plain-text gRPC cannot talk to a TLS port.
    assert await _info_code(proc.address, auth.auth_metadata(TOKEN)) == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    monkeypatch.setenv(auth.CA_ENV, str(cert))
    async with LoaderClient(proc.address, wait_s=10) as client:
        await client.wait_ready(30)
        scores = await client.next_token([PromptItem("hello")], top_k=3)
    assert len(scores[0].top) == 3
    # TLS without the token is still refused.
    monkeypatch.delenv(auth.TOKEN_ENV)
    async with LoaderClient(proc.address, wait_s=10) as client:
        with pytest.raises(Unauthenticated):
            await client.info()
    headers = auth.loader_http_headers({auth.TOKEN_ENV: TOKEN})
    with httpx.Client(base_url=f"https://127.0.0.1:{proc.http_port}", verify=str(cert)) as http:
        reply = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers=headers,
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert http.get("/healthz").status_code == 200
        assert http.get("/v1/models").status_code == 401


def test_token_and_tls_settings(tmp_path: Path) -> None:
    assert auth.loader_token({}) is None
    assert auth.loader_token({auth.TOKEN_ENV: "  abc  "}) == "abc"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert auth.loader_token({auth.TOKEN_FILE_ENV: str(token_file)}) == "from-file"
    token_file.write_text("\n")
    with pytest.raises(FailedPrecondition, match=r"QSENS_LOADER_TOKEN_FILE: .* is empty"):
        auth.loader_token({auth.TOKEN_FILE_ENV: str(token_file)})
    with pytest.raises(FailedPrecondition, match="QSENS_LOADER_TOKEN_FILE: cannot read"):
        auth.loader_token({auth.TOKEN_FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(FailedPrecondition, match="QSENS_LOADER_TLS_KEY"):
        auth.server_tls({auth.CERT_ENV: str(token_file)})
    assert auth.server_tls({}) is None
    assert auth.bearer_matches("Bearer abc", "abc")
    assert auth.bearer_matches(b"bearer abc", "abc")
    assert not auth.bearer_matches("Bearer abcd", "abc")
    assert not auth.bearer_matches("abc", "abc")
    assert not auth.bearer_matches(None, "abc")
    assert len(auth.new_token()) >= 40 and auth.new_token() != auth.new_token()


def test_loader_refuses_to_start_with_an_empty_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("")
    with pytest.raises(RuntimeError, match="is empty"):
        start_loader(
            "tiny:llama", "fp32", env={auth.TOKEN_FILE_ENV: str(empty)}, http=False, metrics=False
        )
