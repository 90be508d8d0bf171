"""The loader's shared secret and TLS files: read them, check a bearer token, dial a loader.

One contract for the loader and every client (workers, the judge, the CLI, bench scripts):

* the token comes from ``QSENS_LOADER_TOKEN`` or from the file named by
  ``QSENS_LOADER_TOKEN_FILE`` (a Kubernetes Secret mounted as a file); when one is set the
  loader requires ``authorization: Bearer <token>`` on every gRPC call (metadata) and HTTP
  request (header), health probes excepted, and clients send it;
* TLS is optional: the loader serves gRPC and HTTPS with ``QSENS_LOADER_TLS_CERT`` and
  ``QSENS_LOADER_TLS_KEY`` (PEM files); clients trust ``QSENS_LOADER_TLS_CA`` and dial with
  TLS when it is set.

Tokens are compared in constant time (``hmac.compare_digest``) so response timing reveals
nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import FailedPrecondition

__all__ = [
    "CA_ENV",
    "CERT_ENV",
    "KEY_ENV",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "ServerTls",
    "auth_metadata",
    "bearer_matches",
    "client_tls_ca",
    "loader_channel",
    "loader_http_headers",
    "loader_token",
    "new_token",
    "server_tls",
]

TOKEN_ENV = "QSENS_LOADER_TOKEN"
TOKEN_FILE_ENV = "QSENS_LOADER_TOKEN_FILE"
CERT_ENV = "QSENS_LOADER_TLS_CERT"
KEY_ENV = "QSENS_LOADER_TLS_KEY"
CA_ENV = "QSENS_LOADER_TLS_CA"
AUTH_KEY = "authorization"
_SCHEME = "bearer "


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"{variable}: cannot read {path}: {exc.strerror}") from None


def loader_token(env: Mapping[str, str] | None = None) -> str | None:
    """The loader token (``QSENS_LOADER_TOKEN``, else the ``QSENS_LOADER_TOKEN_FILE`` file).

    None when neither is set. A token file that is named but unreadable or empty is an error:
    silently serving without authentication would be worse than not starting.
    """
    values = _env(env)
    token = values.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = values.get(TOKEN_FILE_ENV, "").strip()
    if not path:
        return None
    text = _read(path, TOKEN_FILE_ENV).decode("utf-8", errors="replace").strip()
    if not text:
        raise FailedPrecondition(f"{TOKEN_FILE_ENV}: {path} is empty")
    return text


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe) for a stack that makes its own."""
    return secrets.token_urlsafe(32)


def bearer_matches(header: str | bytes | None, token: str) -> bool:
    """Whether an ``authorization`` value is ``Bearer <token>`` (constant-time comparison)."""
    if header is None:
        return False
    value = header.decode("latin-1") if isinstance(header, bytes) else str(header)
    if value[: len(_SCHEME)].lower() != _SCHEME:
        return False
    given = value[len(_SCHEME) :].strip().encode("utf-8", errors="replace")
    return hmac.compare_digest(given, token.encode("utf-8"))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries ``token`` (nothing without one)."""
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()


def loader_http_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """HTTP headers for a loader's OpenAI-compatible endpoint (the Authorization header)."""
    token = loader_token(env)
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class ServerTls:
    """The loader's certificate chain and private key (PEM), with the files they came from."""

    cert_path: str
    key_path: str
    cert: bytes
    key: bytes

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])


def server_tls(env: Mapping[str, str] | None = None) -> ServerTls | None:
    """The loader's TLS files, or None when TLS is off; one of the pair alone is an error."""
    values = _env(env)
    cert = values.get(CERT_ENV, "").strip()
    key = values.get(KEY_ENV, "").strip()
    if not cert and not key:
        return None
    if not cert or not key:
        missing = CERT_ENV if not cert else KEY_ENV
        raise FailedPrecondition(f"{missing}: TLS needs both {CERT_ENV} and {KEY_ENV}")
    return ServerTls(cert, key, _read(cert, CERT_ENV), _read(key, KEY_ENV))


def client_tls_ca(env: Mapping[str, str] | None = None) -> bytes | None:
    """The CA bundle clients trust for the loader (PEM), or None to dial without TLS."""
    path = _env(env).get(CA_ENV, "").strip()
    return _read(path, CA_ENV) if path else None


class _AddMetadata:
    """Adds fixed metadata (the token) to every call on a channel, Info and health included."""

    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = tuple(extra)

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._extra)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under one call type only (the first base it matches), so
# unary and streaming calls need an object each.
class _UnaryMetadata(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self.details(details), request)


class _StreamMetadata(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self.details(details), request)


def loader_channel(
    address: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    env: Mapping[str, str] | None = None,
) -> grpc.aio.Channel:
    """An asyncio gRPC channel to a loader that sends the token and uses TLS when configured."""
    token = loader_token(env)
    metadata = auth_metadata(token)
    interceptors: list[Any] | None = (
        [_UnaryMetadata(metadata), _StreamMetadata(metadata)] if token else None
    )
    ca = client_tls_ca(env)
    if ca is not None:
        return grpc.aio.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=list(options),
            interceptors=interceptors,
        )
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
