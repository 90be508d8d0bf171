"""Pod templates: resources, probes, the restricted security profile, GPUs, graceful shutdown,
and ports that agree with the settings the processes read."""

from __future__ import annotations

import json
from typing import Any

from services.common.settings import LoaderSettings
from tests.deploy.manifests import Pod, container_env, expand_args, is_qsens, of_kind, pods

GPU = "nvidia.com/gpu"
QUANTIZED = ("gptq", "awq")


def _all_pods(
    renders: dict[str, list[dict[str, Any]]],
) -> list[tuple[str, list[dict[str, Any]], Pod]]:
    return [(name, docs, pod) for name, docs in renders.items() for pod in pods(docs)]


def _loaders(docs: list[dict[str, Any]]) -> list[Pod]:
    return [p for p in pods(docs) if p.labels.get("app.kubernetes.io/component") == "loader"]


def test_every_container_has_requests_and_limits(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, _, pod in _all_pods(renders):
        for c in pod.containers():
            resources = c.get("resources", {})
            for bound in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    assert what in resources.get(bound, {}), (
                        f"{name}: {pod.name}/{c['name']} {bound}.{what}"
                    )


def test_long_running_containers_have_probes(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, _, pod in _all_pods(renders):
        if not pod.long_running:
            continue
        for c in pod.spec["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, f"{name}: {pod.name}/{c['name']}"
            if is_qsens(c):
                # Model loads and imports are slow: a startup probe keeps liveness from
                # killing a process that is still starting.
                assert "startupProbe" in c, f"{name}: {pod.name}/{c['name']}"


def test_restricted_security_profile(renders: dict[str, list[dict[str, Any]]]) -> None:
    """What the namespace's Pod Security admission (restricted) demands, plus a read-only
    root filesystem everywhere."""
    for name, _, pod in _all_pods(renders):
        ctx = pod.spec["securityContext"]
        assert ctx["runAsNonRoot"] is True, f"{name}: {pod.name}"
        assert ctx["runAsUser"] != 0 and ctx["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod.containers():
            sc = c["securityContext"]
            where = f"{name}: {pod.name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("runAsNonRoot", True) and sc.get("runAsUser", 1) != 0, where
            assert not sc.get("privileged", False), where
        for volume in pod.spec.get("volumes", []):
            assert "hostPath" not in volume, f"{name}: {pod.name}"


def test_qsens_images_run_as_their_image_user(renders: dict[str, list[dict[str, Any]]]) -> None:
    """docker/Dockerfile.* create uid 10001; pods run as it and own their volumes."""
    for name, _, pod in _all_pods(renders):
        if any(is_qsens(c) for c in pod.containers()):
            assert pod.spec["securityContext"]["runAsUser"] == 10001, f"{name}: {pod.name}"


def test_writable_paths_are_volumes(renders: dict[str, list[dict[str, Any]]]) -> None:
    """With a read-only root, /tmp and the cache folder (QSENS_CACHE_DIR, HF_HOME) are mounts."""
    for name, docs, pod in _all_pods(renders):
        for c in pod.containers():
            if not is_qsens(c) or not pod.long_running:
                continue
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            env = container_env(docs, c)
            assert "/tmp" in mounts, f"{name}: {pod.name}"
            assert env["QSENS_CACHE_DIR"] in mounts, f"{name}: {pod.name}"
            assert env["QSENS_HOME"].startswith("/tmp/"), f"{name}: {pod.name}"


GFD_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_STUDIES = ("example-study", "example-study-submit", "example-study-plain")


def test_loaders_request_one_gpu_on_gpu_nodes(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The GPU request is what puts a loader on a GPU node: no label of GPU Feature Discovery
    is required (clusters without it schedule them too)."""
    for name in GPU_STUDIES:
        loaders = _loaders(renders[name])
        assert len(loaders) == 5
        for pod in loaders:
            (c,) = pod.spec["containers"]
            assert c["resources"]["limits"][GPU] == 1 and c["resources"]["requests"][GPU] == 1
            assert "nodeSelector" not in pod.spec and "affinity" not in pod.spec, pod.name
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod.spec[
                "tolerations"
            ]
            # One GPU per variant: a rolling update would need a second one.
            assert pod.owner["spec"]["strategy"]["type"] == "Recreate"
            # PyTorch needs more shared memory than the container default.
            shm = [
                v for v in pod.spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"
            ]
            assert shm and any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])


def test_gpu_feature_discovery_is_an_option(renders: dict[str, list[dict[str, Any]]]) -> None:
    """components/gpu-feature-discovery pins the GPU pods, and only those, to GFD's label."""
    docs = renders["base+gpu-feature-discovery"]
    pinned = {
        p.labels["app.kubernetes.io/component"] for p in pods(docs) if "nodeSelector" in p.spec
    }
    assert pinned == {"loader", "quantizer"}
    for pod in pods(docs):
        if "nodeSelector" in pod.spec:
            assert pod.spec["nodeSelector"] == GFD_LABEL, pod.name


def test_only_loaders_and_the_quantizer_use_gpus(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, _, pod in _all_pods(renders):
        on_gpu = ("loader", "quantizer")
        if pod.labels.get("app.kubernetes.io/component") in on_gpu and name != "local-kind":
            continue
        if name == "base+gpu-feature-discovery":
            continue  # checked above
        for c in pod.containers():
            assert GPU not in c["resources"].get("limits", {}), f"{name}: {pod.name}"
        assert "nodeSelector" not in pod.spec, f"{name}: {pod.name}"


def test_local_kind_loaders_run_on_cpu(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["local-kind"]
    loaders = _loaders(docs)
    assert len(loaders) == 2
    for pod in loaders:
        env = container_env(docs, pod.spec["containers"][0])
        assert env["VARIANT_DEVICE"] == "cpu" and "tolerations" not in pod.spec


def test_loader_grace_period_covers_its_drain(renders: dict[str, list[dict[str, Any]]]) -> None:
    """SIGTERM drains in-flight RPCs for QSENS_LOADER_GRACE_PERIOD_S; the kubelet must wait at
    least that long, plus time to stop, before it kills the process."""
    default = LoaderSettings.model_fields["grace_period_s"].default
    for name, docs in renders.items():
        for pod in _loaders(docs):
            env = container_env(docs, pod.spec["containers"][0])
            grace = float(env.get("QSENS_LOADER_GRACE_PERIOD_S", default))
            assert pod.spec["terminationGracePeriodSeconds"] >= grace + 10, f"{name}: {pod.name}"
            # Liveness must not kill a draining loader (health NOT_SERVING) before the drain ends.
            probe = pod.spec["containers"][0]["livenessProbe"]
            assert probe["periodSeconds"] * probe["failureThreshold"] >= grace


# The longest job a worker runs (an 8B extraction, a quantization on one GPU), in seconds.
LONGEST_JOB_S = 3600


def test_workers_wait_for_their_running_job(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Scale-in (KEDA, an HPA), rollouts and drains send SIGTERM: the worker fetches nothing
    more and finishes its jobs, and the kubelet waits a whole job for it before killing."""
    for pod in pods(renders["base"]):
        component = pod.labels["app.kubernetes.io/component"]
        if component in ("extractor", "steerer", "analyzer", "quantizer"):
            assert pod.spec["terminationGracePeriodSeconds"] >= LONGEST_JOB_S, pod.name
        if component == "judge":
            # The judge service answers requests in flight for 30 s after SIGTERM.
            assert pod.spec["terminationGracePeriodSeconds"] > 30


def test_loader_ports_match_its_settings(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The ports the loader binds (from QSENS_* settings) are the ports declared, probed,
    scraped and served."""
    for name, docs in renders.items():
        for pod in _loaders(docs):
            (c,) = pod.spec["containers"]
            env = container_env(docs, c)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["grpc"] == int(env["QSENS_LOADER_PORT"])
            assert ports["http"] == int(env["QSENS_LOADER_HTTP_PORT"])
            assert ports["metrics"] == int(env["QSENS_METRICS_PORT"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"]["port"] == ports["grpc"], (name, probe)
            assert env["QSENS_LOADER_HOST"] == "0.0.0.0" and env["QSENS_METRICS_HOST"] == "0.0.0.0"
            # Workers reach the loader at the address it announces: the pod IP.
            advertise = next(e for e in c["env"] if e["name"] == "QSENS_LOADER_ADVERTISE_HOST")
            assert advertise["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_metrics_ports_are_scraped(renders: dict[str, list[dict[str, Any]]]) -> None:
    """prometheus.io/port names the port the process serves /metrics on."""
    for name, docs, pod in _all_pods(renders):
        if not pod.long_running:
            continue
        assert pod.annotations.get("prometheus.io/scrape") == "true", f"{name}: {pod.name}"
        port = int(pod.annotations["prometheus.io/port"])
        declared = {p["containerPort"] for c in pod.containers() for p in c.get("ports", [])}
        assert port in declared, f"{name}: {pod.name}"
        for c in pod.containers():
            if is_qsens(c):
                assert int(container_env(docs, c)["QSENS_METRICS_PORT"]) == port


def test_loader_disruption_budgets(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Each loader Deployment has a budget that selects its pods and no other variant's."""
    for name, docs in renders.items():
        loaders = _loaders(docs)
        budgets = of_kind(docs, "PodDisruptionBudget")
        assert len(budgets) == len(loaders), name
        for pdb in budgets:
            selector = pdb["spec"]["selector"]["matchLabels"]
            selected = [p for p in loaders if selector.items() <= p.labels.items()]
            assert len(selected) == 1, f"{name}: {pdb['metadata']['name']}"
            # A drain may always move one pod: a single replica never blocks it.
            assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
            assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
            replicas = selected[0].owner["spec"].get("replicas", 1)
            assert _disruptions_allowed(pdb, replicas) >= 1, f"{name}: {pdb['metadata']['name']}"


def _disruptions_allowed(pdb: dict[str, Any], healthy: int) -> int:
    """What the disruption controller allows with ``healthy`` ready pods (integer budgets)."""
    spec = pdb["spec"]
    if "minAvailable" in spec:
        return max(0, healthy - int(spec["minAvailable"]))
    return max(0, int(spec["maxUnavailable"]) - 0) if healthy else 0


def test_disruption_arithmetic() -> None:
    """The helper above blocks a single replica under minAvailable: 1 (the old budget)."""
    old = {"spec": {"minAvailable": 1}}
    assert _disruptions_allowed(old, 1) == 0 and _disruptions_allowed(old, 2) == 1
    assert _disruptions_allowed({"spec": {"maxUnavailable": 1}}, 1) == 1


def test_quantizer_runs_on_one_gpu_and_scales_from_zero(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """The quantize worker: the loader image (CUDA torch and gptqmodel), one GPU on a GPU node,
    no replica unless asked for (base) or while quantize jobs wait (KEDA)."""
    for name in (
        "base",
        "example-study",
        "example-study-submit",
        "example-study-plain",
        "local-kind",
    ):
        docs = renders[name]
        (pod,) = [p for p in pods(docs) if p.labels["app.kubernetes.io/component"] == "quantizer"]
        (c,) = pod.spec["containers"]
        assert c["args"] == ["worker", "run", "quantizer"]
        assert c["image"].rsplit("/", 1)[-1].split(":")[0] == "qsens-loader", name
        env = container_env(docs, c)
        assert {"QSENS_S3_SECRET_KEY", "QSENS_NATS_PASSWORD"} <= set(env), name
        if name == "local-kind":
            assert GPU not in c["resources"]["limits"] and "nodeSelector" not in pod.spec
            continue
        assert c["resources"]["limits"][GPU] == 1 and c["resources"]["requests"][GPU] == 1
        assert "nodeSelector" not in pod.spec
        assert pod.owner["spec"]["strategy"]["type"] == "Recreate"
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
        if name == "base":
            assert pod.owner["spec"]["replicas"] == 0
        elif name == "example-study-plain":  # no KEDA: one replica makes the checkpoints
            assert pod.owner["spec"]["replicas"] == 1 and not of_kind(docs, "ScaledObject")
        else:  # KEDA owns the count: 0 until a quantize job waits
            assert "replicas" not in pod.owner["spec"]
            scaled = [
                so
                for so in of_kind(docs, "ScaledObject")
                if so["spec"]["scaleTargetRef"]["name"] == "qsens-quantizer"
            ]
            assert len(scaled) == 1 and scaled[0]["spec"]["minReplicaCount"] == 0


def test_quantized_loaders_wait_for_their_checkpoint(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """A gptq/awq loader starts only once its checkpoint exists: an init container runs the
    loader's command with --quantize --fetch-only (waiting, announced) on the cache volume the
    loader reads, and the loader itself gets the same --quantize request."""
    for name in ("example-study", "example-study-submit"):
        docs = renders[name]
        quantized = [p for p in _loaders(docs) if p.labels["qsens.io/precision"] in QUANTIZED]
        assert {p.labels["qsens.io/precision"] for p in quantized} == set(QUANTIZED)
        for pod in quantized:
            (init,) = pod.spec["initContainers"]
            (c,) = pod.spec["containers"]
            init_args = expand_args(init, container_env(docs, init))
            args = expand_args(c, container_env(docs, c))
            request = json.loads(pod.annotations["qsens.io/quantize"])
            for line in (init_args, args):
                assert json.loads(line[line.index("--quantize") + 1]) == request
                assert "--announce" in line
                assert line[line.index("--precision") + 1] == request["method"]
                assert line[line.index("--name") + 1] == request["model"]
            assert init_args[:2] == ["serve", "loader"] and "--fetch-only" in init_args
            assert "--fetch-only" not in args
            mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
            loader_mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            cache = container_env(docs, c)["QSENS_CACHE_DIR"]
            assert container_env(docs, init)["QSENS_CACHE_DIR"] == cache
            assert mounts[cache] == loader_mounts[cache]
            assert "nvidia.com/gpu" not in init["resources"]["limits"]
        for pod in _loaders(docs):
            if pod.labels["qsens.io/precision"] not in QUANTIZED:
                assert "initContainers" not in pod.spec, pod.name
                assert "--quantize" not in pod.spec["containers"][0]["args"], pod.name


def test_worker_liveness_reflects_the_consumer_loop(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """Job workers (`qsens worker run`) are probed for liveness on /livez, the heartbeat of
    their consumer's event loop (services/common/liveness.py), not on /metrics, which a hung
    loop still serves; readiness stays on /metrics."""
    checked = 0
    for name, _, pod in _all_pods(renders):
        for c in pod.spec["containers"]:
            if not is_qsens(c) or c.get("args", [])[:2] != ["worker", "run"]:
                continue
            for probe in ("startupProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/livez", "port": "metrics"}, (name, probe)
            assert c["readinessProbe"]["httpGet"]["path"] == "/metrics"
            # The kubelet restarts only after the heartbeat has been stale for a while.
            live = c["livenessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] >= 60, (name, pod.name)
            checked += 1
    assert checked >= 4 * 5
