"""The processes the manifests start do what the probes, the Services and the workers expect,
run with the manifests' own command lines and environment (NATS, S3, ports and bind address
swapped for the test servers and loopback)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.loader_registry import LoaderRegistry
from services.common.localstack import free_ports
from services.common.natsconn import connection
from tests.deploy.manifests import REPO, container_env, data_of, expand_args, pods

pytestmark = pytest.mark.slow


def _launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            cwd=REPO,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.status, resp.read().decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float]:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    return proc.returncode, time.monotonic() - start


def _loader_token(docs: list[dict[str, Any]]) -> str:
    """The token of the rendered qsens-loader-token Secret (key `token`)."""
    (secret,) = [
        d
        for d in docs
        if d["kind"] == "Secret" and d["metadata"]["name"].startswith("qsens-loader-token-")
    ]
    return data_of(secret)["token"]


def _local(
    env: dict[str, str], tmp: Path, plane: dict[str, str], docs: list[dict[str, Any]]
) -> dict[str, str]:
    """The container's environment with the cluster's addresses swapped for the test's, and
    the loader token file (a mounted Secret in the pod) written where the test can read it."""
    swapped = {k: v for k, v in env.items() if not k.startswith(("QSENS_NATS_", "QSENS_S3_"))}
    swapped.update(plane)
    if "QSENS_LOADER_TOKEN_FILE" in env:
        token_file = tmp / "loader-token"
        token_file.write_text(_loader_token(docs))
        swapped["QSENS_LOADER_TOKEN_FILE"] = str(token_file)
    swapped.update(
        QSENS_CACHE_DIR=str(tmp / "cache"),
        QSENS_HOME=str(tmp / "home"),
        QSENS_METRICS_HOST="127.0.0.1",
        QSENS_LOG_FORMAT="text",
    )
    return swapped


async def test_loader_serves_what_its_probes_check(
    renders: dict[str, list[dict[str, Any]]], plane_env: Any, tmp_path: Path
) -> None:
    """The local-kind bf16 loader: gRPC health SERVING on QSENS_LOADER_PORT (the kubelet's
    grpc probe), /metrics on QSENS_METRICS_PORT, the HTTP API on QSENS_LOADER_HTTP_PORT, its
    variant announced at the advertised address, and a clean exit on SIGTERM well within
    terminationGracePeriodSeconds."""
    docs = renders["local-kind"]
    pod = next(p for p in pods(docs) if p.labels.get("qsens.io/precision") == "bf16")
    (c,) = pod.spec["containers"]
    manifest_env = container_env(docs, c)
    args = expand_args(c, manifest_env)
    port, http_port, metrics_port = free_ports(3)
    env = _local(manifest_env, tmp_path, plane_env.env, docs)
    env.update(
        QSENS_LOADER_HOST="127.0.0.1",
        QSENS_LOADER_ADVERTISE_HOST="127.0.0.1",
        QSENS_LOADER_PORT=str(port),
        QSENS_LOADER_HTTP_PORT=str(http_port),
        QSENS_METRICS_PORT=str(metrics_port),
    )
    log = tmp_path / "loader.log"
    proc = _launch(args, env, log)
    try:
        deadline = time.monotonic() + 240
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"loader exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"no SERVING health in 240 s:\n{log.read_text()[-3000:]}")
                await asyncio.sleep(0.5)
        status, body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "python_info" in body
        # The HTTP API requires the token the clients send (the mounted Secret's).
        status, _ = _get(f"http://127.0.0.1:{http_port}/health", _loader_token(docs))
        assert status == 200
        variant = f"{manifest_env['VARIANT_MODEL_NAME']}@{manifest_env['VARIANT_PRECISION']}"
        async with connection(name="deploy-test") as nc:
            registry = await LoaderRegistry.open(nc.jetstream())
            assert await registry.find(variant) == f"127.0.0.1:{port}"
    finally:
        code, took = _stop(proc, pod.spec["terminationGracePeriodSeconds"])
    assert code == 0, log.read_text()[-3000:]
    assert took < pod.spec["terminationGracePeriodSeconds"]


def test_worker_serves_metrics_for_its_probes(
    renders: dict[str, list[dict[str, Any]]], plane_env: Any, tmp_path: Path
) -> None:
    """The extractor Deployment's process, once consuming, answers GET /metrics (readiness and
    the scrape) and its liveness path (the consumer loop's heartbeat) on QSENS_METRICS_PORT."""
    docs = renders["base"]
    pod = next(p for p in pods(docs) if p.labels["app.kubernetes.io/component"] == "extractor")
    (c,) = pod.spec["containers"]
    manifest_env = container_env(docs, c)
    (metrics_port,) = free_ports(1)
    env = _local(manifest_env, tmp_path, plane_env.env, docs)
    env["QSENS_METRICS_PORT"] = str(metrics_port)
    log = tmp_path / "worker.log"
    proc = _launch(expand_args(c, manifest_env), env, log)
    serving = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while not serving.is_set():
            if proc.poll() is not None:
                pytest.fail(f"worker exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            if "worker serving" in log.read_text(errors="replace"):
                serving.set()
            elif time.monotonic() > deadline:
                pytest.fail(f"worker not consuming after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        try:
            status, body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        except OSError as err:
            raise AssertionError(
                f"no /metrics on QSENS_METRICS_PORT={metrics_port}: {err}"
            ) from err
        assert status == 200 and "python_info" in body
        # Its liveness probe's path: the consumer loop's heartbeat, fresh while it consumes.
        probe = c["livenessProbe"]["httpGet"]
        status, body = _get(f"http://127.0.0.1:{metrics_port}{probe['path']}")
        assert status == 200 and "consumer loop alive" in body
    finally:
        code, _ = _stop(proc, pod.spec["terminationGracePeriodSeconds"])
    assert code == 0, log.read_text()[-3000:]


async def test_quantized_loader_init_container_waits_then_fetches(
    renders: dict[str, list[dict[str, Any]]], plane_env: Any, tmp_path: Path
) -> None:
    """The example study's gptq loader's init container, with its own command line and
    environment: announced 'waiting' (naming the quantize job and the checkpoint) while no
    checkpoint exists; once one is committed it fetches it into the cache volume, withdraws the
    announcement and exits 0, so the loader container starts with the checkpoint in place."""
    import json

    import numpy as np

    from services.common.quantization import parse_request
    from services.common.store import S3Store
    from services.common.tensor_codec import save_safetensors
    from services.quantizer.checkpoint import commit_checkpoint, resolve_checkpoint_id

    docs = renders["example-study"]
    pod = next(p for p in pods(docs) if p.labels.get("qsens.io/precision") == "gptq")
    (init,) = pod.spec["initContainers"]
    manifest_env = container_env(docs, init)
    args = expand_args(init, manifest_env)
    request = parse_request(json.loads(pod.annotations["qsens.io/quantize"]))
    checkpoint, _ = resolve_checkpoint_id(request, S3Store())
    variant = f"{request.model}@{request.method}"
    env = _local(manifest_env, tmp_path, plane_env.env, docs)
    log = tmp_path / "init.log"
    proc = _launch(args, env, log)
    try:
        async with connection(name="deploy-test") as nc:
            registry = await LoaderRegistry.open(nc.jetstream())
            deadline = time.monotonic() + 60
            while not [e for e in await registry.entries(variant) if e.state == "waiting"]:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"init container not waiting ({proc.poll()}):\n{log.read_text()}")
                await asyncio.sleep(0.2)
            (entry,) = await registry.entries(variant)
            assert entry.detail == (
                f"for checkpoint {checkpoint}, made by the job 'quantize {variant}'"
            )
            assert proc.poll() is None
            # What the quantizer would commit (a stand-in: the init container only fetches).
            folder = tmp_path / "made"
            folder.mkdir()
            (folder / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
            weights = {"w": np.arange(8, dtype=np.int32)}
            (folder / "model.safetensors").write_bytes(save_safetensors(weights, {}))
            commit_checkpoint(S3Store(), checkpoint, folder, request, {})
            code = await asyncio.to_thread(proc.wait, 60)
            assert code == 0, log.read_text()[-3000:]
            assert await registry.entries(variant) == []
    finally:
        if proc.poll() is None:
            _stop(proc, 10)
    fetched = Path(env["QSENS_CACHE_DIR"]) / "quantized" / checkpoint
    assert (fetched / "manifest.json").is_file()
    assert (fetched / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()
