"""Autoscaling: the KEDA triggers name the job plane's real streams and consumers (from
PlaneNames), and a real nats-server running the rendered nats.conf reports them where KEDA's
nats-jetstream scaler looks for them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.worker import SERVICES
from services.common.jobs import JobKind
from services.common.localstack import NATS_BINARY, find_binary, free_ports
from services.common.natsconn import PlaneNames, connection
from services.common.queue import JobQueue
from services.common.settings import NatsSettings
from tests.deploy.manifests import INSTALL, container_env, data_of, find, of_kind, pods

KEDA_TARGETS = ("example-study", "example-study-submit")


def _namespace_setting(docs: list[dict[str, Any]]) -> str:
    """QSENS_NATS_NAMESPACE as the workers get it (the settings default if unset)."""
    worker = next(p for p in pods(docs) if p.labels["app.kubernetes.io/component"] == "extractor")
    env = container_env(docs, worker.spec["containers"][0])
    default = NatsSettings.model_fields["namespace"].default
    return env.get("QSENS_NATS_NAMESPACE", default)


def _triggers(so: dict[str, Any], kind: str = "nats-jetstream") -> list[dict[str, str]]:
    return [t["metadata"] for t in so["spec"]["triggers"] if t["type"] == kind]


def _worker_service(docs: list[dict[str, Any]], deployment: str) -> str:
    """`qsens worker run SERVICE` of a Deployment, or its component (judge)."""
    dep = find(docs, "Deployment", deployment)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return (
        args[2]
        if args[:2] == ["worker", "run"]
        else dep["metadata"]["labels"]["app.kubernetes.io/component"]
    )


@pytest.mark.parametrize("target", KEDA_TARGETS)
def test_keda_triggers_name_the_real_queues(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = renders[target]
    names = PlaneNames(_namespace_setting(docs))
    scaled = of_kind(docs, "ScaledObject")
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled} == {
        "qsens-extractor",
        "qsens-steerer",
        "qsens-analyzer",
        "qsens-judge",
        "qsens-quantizer",
    }
    for so in scaled:
        target_name = so["spec"]["scaleTargetRef"]["name"]
        service = _worker_service(docs, target_name)
        queues = {(t["stream"], t["consumer"]) for t in _triggers(so)}
        if service in SERVICES:
            kinds, _ = SERVICES[service]
            # One trigger per job kind the worker consumes, and nothing else.
            assert queues == {(names.job_stream(k), names.consumer(k)) for k in kinds}, target_name
        else:
            # The judge follows the queues whose jobs call it.
            assert queues <= {(names.job_stream(k), names.consumer(k)) for k in JobKind}
            assert queues and _triggers(so, "cpu")
            assert so["spec"]["minReplicaCount"] >= 1, "judge requests need a responder"


@pytest.mark.parametrize("target", KEDA_TARGETS)
def test_keda_scaler_settings(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    """Fields KEDA needs (its CRD is not schema-checked here): endpoint of the NATS Service in
    this namespace, the global account, integer thresholds as strings, sane bounds."""
    docs = renders[target]
    nats_svc = find(docs, "Service", "qsens-nats")
    monitor = next(p["port"] for p in nats_svc["spec"]["ports"] if p["name"] == "monitor")
    endpoint = f"qsens-nats.{nats_svc['metadata']['namespace']}.svc.cluster.local:{monitor}"
    for so in of_kind(docs, "ScaledObject"):
        spec = so["spec"]
        dep = find(docs, "Deployment", spec["scaleTargetRef"]["name"])
        assert "replicas" not in dep["spec"], "an HPA-managed Deployment must not set replicas"
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        if spec["minReplicaCount"] == 0:
            # Scaled to zero, nothing creates the streams the scaler reads: fallback does.
            assert spec["fallback"]["replicas"] >= 1 and spec["fallback"]["failureThreshold"] >= 1
        if "fallback" in spec:
            # KEDA's admission rule (CheckFallbackValid): AverageValue triggers only, no cpu.
            for trigger in spec["triggers"]:
                assert trigger["type"] not in ("cpu", "memory"), so["metadata"]["name"]
                assert trigger.get("metricType") == "AverageValue", so["metadata"]["name"]
        for meta in _triggers(so):
            assert meta["natsServerMonitoringEndpoint"] == endpoint
            assert meta["account"] == "$G"
            assert all(isinstance(v, str) for v in meta.values()), meta
            assert int(meta["lagThreshold"]) >= 1 and int(meta["activationLagThreshold"]) >= 0
        # lagThreshold is jobs per replica: the worker's --concurrency.
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        if "--concurrency" in args:
            concurrency = args[args.index("--concurrency") + 1]
            assert {t["lagThreshold"] for t in _triggers(so)} == {concurrency}


def test_hpa_fallback_scales_the_workers(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["base+hpa-cpu"]
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert len(hpas) == 4
    for hpa in hpas:
        dep = find(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in dep["spec"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["cpu"]  # utilization needs a request


# --- a real nats-server with the rendered configuration ---------------------------------------


@pytest.fixture(scope="module")
def rendered_nats(
    renders: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """nats-server started with the example-study's nats.conf and Secret, on free ports."""
    docs = renders["example-study"]
    sts = find(docs, "StatefulSet", "qsens-nats")
    container = next(
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats"
    )
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    conf = data_of(find(docs, "ConfigMap", volume["configMap"]["name"]))["nats.conf"]
    env = container_env(docs, container)
    folder = tmp_path_factory.mktemp("nats-rendered")
    # The one change: JetStream's store moves from the pod's volume to a temporary folder.
    store = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    assert f"store_dir: {store}/jetstream" in conf
    (folder / "nats.conf").write_text(conf.replace(f"{store}/jetstream", str(folder / "js")))
    try:
        binary = find_binary(*NATS_BINARY)
    except Exception:
        pytest.fail(f"nats-server is not installed; install it with: {INSTALL['nats-server']}")
    port, monitor = free_ports(2)
    # Loopback and free ports (command-line flags override the file's).
    argv = [binary, "-c", str(folder / "nats.conf"), "-a", "127.0.0.1", "-p", str(port),
            "-m", str(monitor)]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_http(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", proc)
        yield {"port": port, "monitor": monitor, "env": env}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"nats-server exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer")


def test_rendered_nats_conf_is_valid(rendered_nats: dict[str, Any]) -> None:
    """The server started from the rendered file (config, variables from the Secret, JetStream)
    and its probe endpoints answer."""
    for path in ("/healthz", "/healthz?js-enabled-only=true"):
        with urllib.request.urlopen(f"http://127.0.0.1:{rendered_nats['monitor']}{path}") as r:
            assert r.status == 200


async def test_clients_need_the_secret_credentials(rendered_nats: dict[str, Any]) -> None:
    env = rendered_nats["env"]
    url = f"nats://127.0.0.1:{rendered_nats['port']}"
    good = NatsSettings(url=url, user=env["QSENS_NATS_USER"], password=env["QSENS_NATS_PASSWORD"])
    async with connection(good) as nc:
        assert nc.is_connected
    from services.common.errors import Unavailable

    bad = NatsSettings(url=url, user=env["QSENS_NATS_USER"], password="wrong", connect_timeout_s=2)
    with pytest.raises(Unavailable):
        async with connection(bad):
            pass


async def test_keda_finds_every_trigger_on_the_rendered_server(
    rendered_nats: dict[str, Any], renders: dict[str, list[dict[str, Any]]]
) -> None:
    """Create the job plane as the workers do, then read /jsz with the query KEDA's scaler
    sends (account from the trigger): every trigger's stream and consumer is there."""
    env = rendered_nats["env"]
    docs = renders["example-study"]
    settings = NatsSettings(
        url=f"nats://127.0.0.1:{rendered_nats['port']}",
        user=env["QSENS_NATS_USER"],
        password=env["QSENS_NATS_PASSWORD"],
        namespace=_namespace_setting(docs),
    )
    async with connection(settings) as nc:
        await JobQueue(nc.jetstream(), settings).ensure()
    triggers = [t for so in of_kind(docs, "ScaledObject") for t in _triggers(so)]
    accounts = {t["account"] for t in triggers}
    assert accounts == {"$G"}
    query = "/jsz?acc=$G&consumers=true&config=true"
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{rendered_nats['monitor']}{query}").read()
    )
    jsz = json.loads(body)
    found = {
        (stream["name"], consumer["name"])
        for account in jsz["account_details"]
        if account["name"] == "$G"
        for stream in account.get("stream_detail", [])
        for consumer in stream.get("consumer_detail", [])
    }
    for t in triggers:
        assert (t["stream"], t["consumer"]) in found, t


def test_monitoring_port_matches_the_service(renders: dict[str, list[dict[str, Any]]]) -> None:
    """nats.conf's http_port is the container's monitor port that KEDA and the probes use."""
    docs = renders["example-study"]
    sts = find(docs, "StatefulSet", "qsens-nats")
    container = next(
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats"
    )
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    conf = data_of(find(docs, "ConfigMap", volume["configMap"]["name"]))["nats.conf"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"\nhttp_port: {ports['monitor']}\n" in conf
    assert f"\nport: {ports['client']}\n" in conf
    exporter = next(
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "exporter"
    )
    assert f"http://localhost:{ports['monitor']}" in exporter["args"]
    assert "-jsz=all" in exporter["args"]
    # Clients use the Service's client port.
    common = data_of(
        next(
            d
            for d in of_kind(docs, "ConfigMap")
            if d["metadata"]["name"].startswith("qsens-common-")
        )
    )
    assert common["QSENS_NATS_URL"] == f"nats://qsens-nats:{ports['client']}"
    assert Path(common["QSENS_CACHE_DIR"]).is_absolute()


def test_plain_overlay_needs_neither_keda_nor_the_operator(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """overlays/example-study-plain: only built-in kinds (a cluster without KEDA or the
    Prometheus Operator applies it), CPU HPAs for the workers, the same five loaders."""
    docs = renders["example-study-plain"]
    groups = {d["apiVersion"].rpartition("/")[0] for d in docs}
    assert not {"keda.sh", "monitoring.coreos.com"} & groups
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")}
    assert scaled == {"qsens-extractor", "qsens-steerer", "qsens-analyzer", "qsens-judge"}
    for name in scaled:
        assert "replicas" not in find(docs, "Deployment", name)["spec"], name
    loaders = {
        p.labels["qsens.io/precision"]
        for p in pods(docs)
        if p.labels["app.kubernetes.io/component"] == "loader"
    }
    assert loaders == {"bf16", "nf4", "int8", "gptq", "awq"}
