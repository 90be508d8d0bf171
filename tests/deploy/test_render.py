"""Every kustomize target renders, validates against the Kubernetes schemas, and hangs together:
one namespace, references that resolve, pinned images, Services that select pods."""

from __future__ import annotations

import tomllib
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    CLUSTER_TARGETS,
    CRD_KINDS,
    REPO,
    TARGETS,
    Pod,
    find,
    is_qsens,
    of_kind,
    pods,
)

# The oldest Kubernetes the manifests are meant for (gRPC probes, policy/v1
# unhealthyPodEvictionPolicy, autoscaling/v2) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def test_every_target_renders(renders: dict[str, list[dict[str, Any]]]) -> None:
    assert set(renders) == set(TARGETS)
    for name, docs in renders.items():
        kinds = {d["kind"] for d in docs}
        if name in CLUSTER_TARGETS:
            assert "Namespace" in kinds, name
            continue
        assert {"StatefulSet", "Deployment", "Secret", "ConfigMap"} <= kinds, name


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_schemas(renders: dict[str, list[dict[str, Any]]], version: str) -> None:
    """Strict schema validation (unknown fields are errors) of every built-in kind."""
    checked = 0
    for name, docs in renders.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(
                    f"{name}: {doc['kind']}/{doc['metadata']['name']} at "
                    f"{'/'.join(map(str, err.path))}: {err.message}"
                )
            checked += 1
    assert checked > 50


def test_only_known_crds(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Schema validation skips CRD kinds: only those the other tests check by hand exist."""
    for docs in renders.values():
        for doc in docs:
            group = doc["apiVersion"].rpartition("/")[0]
            if "." in group and not group.endswith(".k8s.io"):
                assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, doc["kind"]


# Cluster-scoped kinds: they carry no namespace.
CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding"}


def test_one_namespace(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Every namespaced object of every target lives in the Namespace that deploy/k8s/cluster
    makes, and only that target makes it."""
    (namespace,) = of_kind(renders["cluster"], "Namespace")
    ns = namespace["metadata"]["name"]
    for name, docs in renders.items():
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace") == ns, f"{name}: {doc['kind']}"
    # Every pod in it meets the restricted Pod Security Standard (see test_pods).
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _references(pod: Pod) -> set[tuple[str, str, bool]]:
    """(kind, name, optional) of every ConfigMap/Secret a pod template uses."""
    refs: set[tuple[str, str, bool]] = set()
    for c in pod.containers():
        for source in c.get("envFrom", []):
            for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if key in source:
                    refs.add((kind, source[key]["name"], bool(source[key].get("optional"))))
        for item in c.get("env", []):
            ref = item.get("valueFrom", {})
            for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if key in ref:
                    refs.add((kind, ref[key]["name"], bool(ref[key].get("optional"))))
    for volume in pod.spec.get("volumes", []):
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"], False))
        if "secret" in volume:
            refs.add(("Secret", volume["secret"]["secretName"], False))
    return refs


def test_references_resolve(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Every ConfigMap/Secret a pod uses exists under its generated (hashed) name, and every
    pod runs as the qsens ServiceAccount."""
    for name, docs in renders.items():
        present = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for pod in pods(docs):
            for kind, ref, optional in _references(pod):
                assert (kind, ref) in present or optional, f"{name}: {pod.name} uses {kind}/{ref}"
                if kind in ("ConfigMap", "Secret"):
                    # Generated names carry a content hash, so a change rolls the pods.
                    assert ref.rsplit("-", 1)[-1] != ref, f"{name}: {kind}/{ref} has no hash"
            account = pod.spec["serviceAccountName"]
            assert ("ServiceAccount", account) in present
            assert pod.spec["automountServiceAccountToken"] is False, pod.name


def _image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def test_images_are_pinned(renders: dict[str, list[dict[str, Any]]]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name, docs in renders.items():
        for pod in pods(docs):
            for c in pod.containers():
                tag = _image_tag(c["image"])
                assert tag and tag != "latest", (name, c["image"])
                assert c["imagePullPolicy"] == "IfNotPresent", (name, c["name"])
                if is_qsens(c) and name != "local-kind":
                    # qsens images are tagged with the project's version.
                    assert tag == version, (name, c["image"])


def test_services_select_pods(renders: dict[str, list[dict[str, Any]]]) -> None:
    """A Service selects pods of the render, and its target ports are named container ports."""
    for name, docs in renders.items():
        for svc in of_kind(docs, "Service"):
            selector = svc["spec"]["selector"]
            matching = [p for p in pods(docs) if selector.items() <= p.labels.items()]
            assert matching, f"{name}: Service/{svc['metadata']['name']} selects no pod"
            for pod in matching:
                ports = {p["name"] for c in pod.containers() for p in c.get("ports", [])}
                for port in svc["spec"]["ports"]:
                    assert port["targetPort"] in ports, (svc["metadata"]["name"], port)


def test_workload_selectors_match_templates(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        for pod in pods(docs):
            if pod.long_running:
                selector = pod.owner["spec"]["selector"]["matchLabels"]
                assert selector.items() <= pod.labels.items(), (name, pod.name)
            assert pod.labels.get("app.kubernetes.io/part-of") == "qsens", (name, pod.name)
            assert pod.labels.get("app.kubernetes.io/component"), (name, pod.name)


def test_statefulsets_have_their_headless_service(renders: dict[str, list[dict[str, Any]]]) -> None:
    for docs in renders.values():
        for sts in of_kind(docs, "StatefulSet"):
            svc = find(docs, "Service", sts["spec"]["serviceName"])
            assert svc["spec"]["clusterIP"] == "None"
