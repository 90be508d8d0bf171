"""The loader process: gRPC service, health, metrics, OpenAI-compatible HTTP, graceful drain.

All model work runs on one dedicated thread (the GPU is used by one pass at a time); the
asyncio server only parses, queues and streams. Requests that need the model are admitted to
a bounded queue (``work.WorkQueue``: RESOURCE_EXHAUSTED with ``retry-after-ms`` trailing
metadata when full) and carry a cancellation token tied to the call (its deadline, the client
cancelling or disconnecting), which the engine checks between micro-batches and decode steps.
The model thread (``work.ModelThread``) starts queued normal-priority work before any
low-priority work (``qsens-priority: low`` metadata, e.g. the judge's perplexity).
``Info`` and health never wait for the model thread: Info's facts are read once at load time
and health is answered by the event loop (a busy loader is still SERVING). One interceptor
maps qsens errors to gRPC status codes, frees accelerator memory after an OOM, counts
requests and times them. SIGTERM flips health to NOT_SERVING, refuses new calls and lets
in-flight ones finish within the grace period.

This module wires the process together (load, serve, drain); the pieces live apart:
``runtime`` (model thread, queue, result checks), ``servicer`` (the RPCs), ``interceptor``
(token, parsing, status codes) and ``rpc_metrics``. Their public names are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import auth
from services.common import settings as settings_mod
from services.common.errors import Unavailable
from services.common.localstack import write_ready_file
from services.common.logging import get_logger
from services.common.metrics import start_metrics_server
from services.common.settings import LoaderSettings
from services.common.variants import parse_precision
from services.loader.backends.registry import load_engine, resolve_backend
from services.loader.interceptor import SERVICE_NAME, ErrorInterceptor
from services.loader.model_source import resolve_source
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.rpc_metrics import metrics
from services.loader.runtime import LoaderRuntime, check_capture, check_generations
from services.loader.servicer import LoaderServicer, call_priority, call_token

__all__ = [
    "SERVICE_NAME",
    "ErrorInterceptor",
    "LoaderRuntime",
    "LoaderServicer",
    "RunningServer",
    "build_runtime",
    "call_priority",
    "call_token",
    "check_capture",
    "check_generations",
    "metrics",
    "serve",
    "start_server",
]

log = get_logger(__name__)


def build_runtime(
    model: str,
    precision: str,
    *,
    backend: str | None = None,
    device: str = "auto",
    name: str | None = None,
    settings: LoaderSettings | None = None,
    engine_name: str | None = None,
) -> LoaderRuntime:
    """Resolve the source and load it through the registered engine of its backend
    (``services.loader.backends.registry``) into a runtime."""
    prec = parse_precision(precision, "precision")
    chosen = resolve_backend(prec, backend, engine_name)  # before any download
    common = settings_mod.get(settings_mod.CommonSettings)
    source = resolve_source(model, common.cache_dir, name)
    started = time.perf_counter()
    limits = settings or settings_mod.get(LoaderSettings)
    engine = load_engine(source, prec, backend=chosen.name, device=device, settings=limits)
    health_now = engine.health()
    if not health_now.ok:
        raise Unavailable(
            f"engine {engine.name!r} is not healthy after loading: {health_now.detail}"
        )
    log.info(
        "model loaded",
        extra={
            "variant": f"{source.name}@{prec.value}",
            "backend": chosen.name,
            "engine": engine.name,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return LoaderRuntime(
        engine,
        model_name=source.name,
        precision=prec,
        backend=chosen.name,
        source=source.source,
        settings=limits,
    )


@dataclass
class RunningServer:
    """Handles of a started loader (gRPC + health + optional HTTP)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    http_port: int
    runtime: LoaderRuntime
    http_thread: threading.Thread | None = None
    http_server: Any = None
    tls: bool = False

    async def drain(self, grace: float) -> None:
        """Refuse new calls and wait up to ``grace`` seconds for in-flight ones."""
        self.runtime.draining = True
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.http_server is not None:
            self.http_server.should_exit = True
        if self.http_thread is not None:
            self.http_thread.join(timeout=5)
        self.runtime.model_thread.shutdown(wait=False, cancel_futures=True)


async def start_server(
    runtime: LoaderRuntime,
    *,
    host: str,
    port: int,
    http_port: int = 0,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start gRPC (and HTTP when ``http_port`` is set) for ``runtime``.

    The token and TLS files come from ``env`` (default: the process environment; see
    ``services.common.auth``); without a token both endpoints are open, as before.
    """
    token = auth.loader_token(env)
    tls = auth.server_tls(env)
    limit = runtime.settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(runtime, token)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_LoaderServiceServicer_to_server(LoaderServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.grpc_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise Unavailable(f"cannot bind gRPC on {host}:{port} (in use?)")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, health_servicer, bound, 0, runtime, tls=tls is not None)
    if http_port:  # 0 disables; -1 picks a free port
        from services.loader.openai_http import start_http

        running.http_server, running.http_thread, running.http_port = start_http(
            runtime, host, max(http_port, 0), token=token, tls=tls
        )
    log.info(
        "loader serving",
        extra={
            "variant": runtime.variant,
            "port": bound,
            "http_port": running.http_port,
            "token": token is not None,
            "tls": tls is not None,
        },
    )
    return running


async def serve(
    model: str,
    precision: str,
    *,
    backend: str | None = None,
    engine: str | None = None,
    device: str = "auto",
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    http_port: int | None = None,
    metrics_port: int | None = None,
    ready_file: str | None = None,
    announce: bool = False,
) -> None:
    """Run a loader until SIGTERM/SIGINT, then drain."""
    limits = settings_mod.get(LoaderSettings)
    common = settings_mod.get(settings_mod.CommonSettings)
    # A bad token file or half a TLS pair fails now, not after minutes of loading weights.
    auth.loader_token()
    auth.server_tls()
    runtime = build_runtime(
        model,
        precision,
        backend=backend,
        device=device,
        name=name,
        settings=limits,
        engine_name=engine,
    )
    mport = common.metrics_port if metrics_port is None else metrics_port
    bound_metrics = start_metrics_server(mport, common.metrics_host) if mport else 0
    running = await start_server(
        runtime,
        host=host or limits.host,
        port=limits.port if port is None else port,
        http_port=limits.http_port if http_port is None else http_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announcer: asyncio.Task[None] | None = None
    if announce:
        from services.common.loader_registry import announce_forever

        bind = limits.advertise_host or host or limits.host
        if bind in ("0.0.0.0", "::", ""):
            bind = socket.getfqdn()
        scheme = "https" if running.tls else "http"
        metadata = (
            {"http": f"{scheme}://{bind}:{running.http_port}/v1"} if running.http_port else {}
        )
        announcer = asyncio.create_task(
            announce_forever(
                runtime.variant,
                f"{bind}:{running.port}",
                metadata=metadata,
                # Workers route each job to a loader whose engine computes it exactly.
                capabilities=runtime.engine.capabilities,
            )
        )
    if ready_file:
        write_ready_file(
            ready_file,
            {
                "port": running.port,
                "http_port": running.http_port,
                "metrics_port": bound_metrics,
                "variant": runtime.variant,
            },
        )
    await stop.wait()
    log.info("draining", extra={"grace_s": limits.grace_period_s})
    if announcer is not None:
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await announcer
    await running.drain(limits.grace_period_s)
    log.info("stopped")
