"""An OpenAI-compatible ``POST /v1/chat/completions`` over the hosted model.

It lets any loader act as a judge: temperature, top_p, n, seed, stop, ``logprobs`` and
``top_logprobs`` follow the OpenAI schema, and errors use OpenAI's error envelope (HTTP 400
with ``param`` naming the field). It runs uvicorn in its own thread and hands model work to the
loader's model thread, so gRPC and HTTP calls queue on the same device in arrival order and
share one bound: when the queue is full the answer is HTTP 429 with ``Retry-After`` (seconds)
and ``retry-after-ms``. A request's work stops when its client disconnects (answer 499, which
nobody reads) or after ``http_timeout_s`` (HTTP 504).

With a loader token set (``services.common.auth``) every path but the probes (``/health``,
``/healthz``, ``/readyz``) needs ``Authorization: Bearer <token>`` (HTTP 401 otherwise), and
with TLS files the endpoint is HTTPS. Bodies over ``http_max_body_bytes`` get HTTP 413 before
they are read whole, and a prompt too long for the token limit is refused before tokenizing.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.auth import ServerTls, bearer_matches
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    QsensError,
    ResourceExhausted,
)
from services.common.logging import get_logger
from services.loader.engine import GenParams, GenResult
from services.loader.work import Busy, CancelToken, WorkCancelled

__all__ = ["build_app", "start_http"]

log = get_logger(__name__)
T = TypeVar("T")
RPC = "chat.completions"
# How often a waiting request looks for its client having gone away.
DISCONNECT_POLL_S = 0.1
# Probes answer without the token (a kubelet or load balancer has none).
OPEN_PATHS = frozenset({"/health", "/healthz", "/readyz"})
# The body limit when the runtime's settings name none.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part["text"]) for part in self.content if part.get("type") == "text")

    def check_parts(self, field: str) -> None:
        """InvalidArgument naming the part when a content part is not ``{"type", "text"}``."""
        if isinstance(self.content, str):
            return
        for j, part in enumerate(self.content):
            if not isinstance(part.get("type"), str):
                raise InvalidArgument(f"{field}.content.{j}.type", "must be a string")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise InvalidArgument(f"{field}.content.{j}.text", "must be a string")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False


def _error(
    status: int, message: str, param: str | None, kind: str = "invalid_request_error"
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": None}},
    )


def _logprobs_payload(result: GenResult, runtime: Any) -> dict[str, Any]:
    content = []
    for step in result.logprobs or []:
        _tid, token, lp = step.chosen
        content.append(
            {
                "token": token,
                "logprob": lp,
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                    for _i, t, v in step.top
                ],
            }
        )
    return {"content": content}


class _Guard:
    """ASGI middleware: the bearer token on every path but the probes, and the body limit
    declared by ``Content-Length`` (a streamed body is counted as it is read)."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        refusal: JSONResponse | None = None
        guarded = self.token is not None and scope.get("path") not in OPEN_PATHS
        if guarded and not bearer_matches(headers.get(b"authorization"), str(self.token)):
            refusal = _error(401, "missing or wrong loader token", None, "authentication_error")
            refusal.headers["WWW-Authenticate"] = "Bearer"
        if refusal is None:
            declared = headers.get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > self.max_body:
                refusal = _too_large(self.max_body)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"the body is larger than {limit} bytes", None)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once more than ``limit`` bytes arrived (chunked bodies too)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _max_body(runtime: Any) -> int:
    return int(getattr(runtime.settings, "http_max_body_bytes", DEFAULT_MAX_BODY_BYTES))


def _busy(exc: Busy) -> JSONResponse:
    response = _error(429, str(exc), None, "rate_limit_error")
    response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    response.headers["retry-after-ms"] = str(max(1, round(exc.retry_after_s * 1000)))
    return response


async def _run_model(runtime: Any, request: Request, fn: Callable[[], T]) -> T:
    """Admit ``fn``, run it on the model thread and stop it if the client goes or time is up."""
    token = CancelToken(time.monotonic() + runtime.settings.http_timeout_s)
    with runtime.admit(RPC, token) as ticket:
        future = runtime.submit(fn, ticket)
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    result: T = waiting.result()
                    return result
                if token.cancelled or await request.is_disconnected():
                    runtime.abandon(future, ticket, "deadline" if token.cancelled else "client")
                    raise token.error()
        finally:
            if not waiting.done():
                # Nobody reads it now; cancelling keeps asyncio from logging its outcome.
                waiting.cancel()


def build_app(runtime: Any, token: str | None = None) -> FastAPI:
    """The FastAPI app for ``runtime`` (a LoaderRuntime); ``token`` guards all but probes."""
    app = FastAPI(title="qsens loader", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, token=token, max_body=_max_body(runtime))

    @app.get("/health")
    async def health_check() -> dict[str, str]:
        return {"status": "draining" if runtime.draining else "ok", "variant": runtime.variant}

    @app.get("/healthz")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def ready() -> JSONResponse:
        if runtime.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "variant": runtime.variant})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": runtime.variant, "object": "model", "created": 0, "owned_by": "qsens"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse:
        raw = await _read_body(request, _max_body(runtime))
        if raw is None:
            return _too_large(_max_body(runtime))
        req = _parse_chat(raw)
        if isinstance(req, JSONResponse):
            return req
        if req.stream:
            return _error(400, "stream: streaming is not supported", "stream")
        if runtime.draining:
            return _error(503, "the loader is shutting down", None, "server_error")
        max_new = req.max_completion_tokens or req.max_tokens or 256
        if max_new > runtime.settings.max_new_tokens:
            return _error(
                400, f"max_tokens: at most {runtime.settings.max_new_tokens}", "max_tokens"
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = GenParams(
            max_new_tokens=max_new,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(s for s in stops if s),
            logprobs=req.logprobs,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
        )
        messages = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        seed = req.seed if req.seed is not None else 0
        try:
            results: list[GenResult] = await _run_model(
                runtime, request, lambda: runtime.generate_chat(messages, params, seed, req.n)
            )
        except Busy as exc:
            return _busy(exc)
        except WorkCancelled as exc:
            if exc.reason == "deadline":
                return _error(504, str(exc), None, "timeout")
            return _error(499, str(exc), None, "client_closed_request")
        except InvalidArgument as exc:
            param = "messages" if exc.field.startswith("messages") else exc.field
            return _error(400, str(exc), param)
        except (FailedPrecondition, ResourceExhausted) as exc:
            return _error(400 if isinstance(exc, FailedPrecondition) else 503, str(exc), None)
        except QsensError as exc:
            return _error(500, str(exc), None, "server_error")
        return JSONResponse(_completion(results, req, runtime))

    return app


def _parse_chat(raw: bytes) -> ChatCompletionRequest | JSONResponse:
    """The validated request, or the 400 response that names what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return _error(400, "the body is not valid JSON", None)
    try:
        req = ChatCompletionRequest.model_validate(body)
        for i, message in enumerate(req.messages):
            message.check_parts(f"messages.{i}")
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        return _error(400, f"{param}: {first['msg']}", param)
    except InvalidArgument as exc:
        return _error(400, str(exc), exc.field)
    return req


def _completion(
    results: list[GenResult], req: ChatCompletionRequest, runtime: Any
) -> dict[str, Any]:
    """The chat.completion body: one choice per result, and the token usage."""
    choices = []
    completion_tokens = 0
    for i, result in enumerate(results):
        completion_tokens += len(result.token_ids)
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": _logprobs_payload(result, runtime) if req.logprobs else None,
            }
        )
    prompt_tokens = results[0].prompt_tokens if results else 0
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": runtime.variant,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def start_http(
    runtime: Any,
    host: str,
    port: int,
    *,
    token: str | None = None,
    tls: ServerTls | None = None,
) -> tuple[Any, threading.Thread, int]:
    """Serve the app on ``host:port`` (0 picks a free port) in a daemon thread; HTTPS with
    ``tls``, the bearer ``token`` required when set."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = int(sock.getsockname()[1])
    config = uvicorn.Config(
        build_app(runtime, token),
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=tls.cert_path if tls is not None else None,
        ssl_keyfile=tls.key_path if tls is not None else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="openai-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, thread, bound
