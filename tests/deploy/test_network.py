"""Who may talk to whom: the rendered NetworkPolicies, evaluated the way a CNI enforces them
(default deny; a connection passes if a policy selecting the sender allows it out and one
selecting the receiver allows it in), give each role exactly its allow-list; and the loader
token reaches every qsens process as the auth contract says (a Secret mounted as a file)."""

from __future__ import annotations

import ipaddress
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.deploy.manifests import container_env, data_of, is_qsens, of_kind, pods

NAMESPACE = "qsens"
STUDIES = ("example-study", "example-study-submit", "local-kind")


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (its namespace's and its own labels) or an address."""

    namespace: dict[str, str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None

    @property
    def ours(self) -> bool:
        return self.namespace is not None and self.namespace.get("kubernetes.io/metadata.name") == (
            NAMESPACE
        )


def _ns(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], who: Peer) -> bool:
    if "ipBlock" in peer:
        if who.ip is None:
            return False
        block = peer["ipBlock"]
        addr = ipaddress.ip_address(who.ip)
        inside = addr in ipaddress.ip_network(block["cidr"])
        return inside and not any(addr in ipaddress.ip_network(c) for c in block.get("except", []))
    if who.namespace is None:
        return False
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], who.namespace)
    else:
        ns_ok = who.ours
    return ns_ok and _selects(peer.get("podSelector", {}), who.labels)


def _rules_allow(rules: list[dict[str, Any]], key: str, other: Peer, port: int) -> bool:
    for rule in rules:
        peers = rule.get(key, [])
        if peers and not any(_peer_matches(p, other) for p in peers):
            continue
        ports = rule.get("ports", [])
        if not ports or any(
            p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports
        ):
            return True
    return False


def allowed(policies: list[dict[str, Any]], src: Peer, dst: Peer, port: int) -> bool:
    """Whether a TCP connection from ``src`` to ``dst:port`` passes the policies."""
    if src.ours:
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], src.labels)]
        egress = [p for p in selecting if "Egress" in p["spec"]["policyTypes"]]
        if egress and not any(
            _rules_allow(p["spec"].get("egress", []), "to", dst, port) for p in egress
        ):
            return False
    if dst.ours:
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], dst.labels)]
        ingress = [p for p in selecting if "Ingress" in p["spec"]["policyTypes"]]
        if ingress and not any(
            _rules_allow(p["spec"].get("ingress", []), "from", src, port) for p in ingress
        ):
            return False
    return True


def _roles(docs: list[dict[str, Any]]) -> dict[str, Peer]:
    """One pod per component (loaders: the first), as a peer in the qsens namespace."""
    out: dict[str, Peer] = {}
    for pod in pods(docs):
        out.setdefault(pod.labels["app.kubernetes.io/component"], Peer(_ns(NAMESPACE), pod.labels))
    return out


KEDA = Peer(_ns("keda"), {"app": "keda-operator"})
PROMETHEUS = Peer(_ns("monitoring"), {"app.kubernetes.io/name": "prometheus"})
OTHER_TENANT = Peer(_ns("team-b"), {"app": "anything"})
INTERNET = Peer(ip="203.0.113.7")

# (from, to, port): every connection qsens needs. Anything else between these roles is denied.
NEEDED = {
    *((c, "nats", 4222) for c in ("loader", "extractor", "steerer", "analyzer", "judge")),
    *((c, "minio", 9000) for c in ("loader", "extractor", "steerer", "analyzer", "minio-setup")),
    *((c, "loader", p) for c in ("extractor", "steerer", "judge") for p in (50051, 8000)),
    ("quantizer", "nats", 4222),
    ("quantizer", "minio", 9000),
    ("submit", "nats", 4222),
    ("submit", "minio", 9000),
    ("models-stage", "minio", 9000),
}
PORTS = (4222, 8222, 7777, 9000, 9001, 50051, 8000, 9090)


def _policies(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = of_kind(docs, "NetworkPolicy")
    assert found, "no NetworkPolicy rendered"
    return found


@pytest.mark.parametrize("target", STUDIES)
def test_default_deny(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    policies = _policies(renders[target])
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in deny
    ), "a policy selecting every pod with no rules"


@pytest.mark.parametrize("target", STUDIES)
def test_each_role_gets_its_allow_list(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = renders[target]
    policies = _policies(docs)
    roles = _roles(docs)
    assert {"nats", "minio", "loader", "extractor", "steerer", "analyzer", "judge"} <= set(roles)
    for src_name, src in roles.items():
        for dst_name, dst in roles.items():
            for port in PORTS:
                got = allowed(policies, src, dst, port)
                if (src_name, dst_name, port) in NEEDED:
                    assert got, f"{target}: {src_name} -> {dst_name}:{port} is blocked"
                else:
                    assert not got, f"{target}: {src_name} -> {dst_name}:{port} is open"


@pytest.mark.parametrize("target", STUDIES)
def test_outside_the_namespace(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    docs = renders[target]
    policies = _policies(docs)
    roles = _roles(docs)
    # KEDA reads NATS monitoring; Prometheus scrapes every metrics port; nobody else gets in.
    assert allowed(policies, KEDA, roles["nats"], 8222)
    assert not allowed(policies, KEDA, roles["nats"], 4222)
    assert allowed(policies, PROMETHEUS, roles["nats"], 7777)
    assert allowed(policies, PROMETHEUS, roles["minio"], 9000)
    for name in ("loader", "extractor", "steerer", "analyzer", "judge"):
        assert allowed(policies, PROMETHEUS, roles[name], 9090), name
        assert not allowed(policies, PROMETHEUS, roles[name], 50051), name
    for name, role in roles.items():
        for port in PORTS:
            assert not allowed(policies, OTHER_TENANT, role, port), (name, port)
    # Out of the cluster: only the judge (its API) over HTTPS; loaders read weights from S3.
    for name, role in roles.items():
        assert allowed(policies, role, INTERNET, 443) == (name in ("judge", "models-stage")), name
        assert not allowed(policies, role, INTERNET, 80), name
        # Names resolve everywhere.
        assert allowed(policies, role, Peer(_ns("kube-system"), {"k8s-app": "kube-dns"}), 53)


def test_evaluator_denies_without_policies_selecting() -> None:
    """The evaluator itself: an ingress-only policy leaves egress open, a deny-all closes."""
    deny = {"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    a = Peer(_ns(NAMESPACE), {"app.kubernetes.io/component": "a"})
    b = Peer(_ns(NAMESPACE), {"app.kubernetes.io/component": "b"})
    assert allowed([], a, b, 80)
    assert not allowed([deny], a, b, 80)
    open_b = {
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "b"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": 80}]}],
        }
    }
    assert not allowed([deny, open_b], a, b, 80)  # a may not send
    assert allowed([open_b], a, b, 80) and not allowed([open_b], a, b, 81)


# -- the loader token ---------------------------------------------------------------------


def _mounted_file(
    pod_spec: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[str, str]:
    """(Secret name, key) of the secret file at ``path`` in ``container``."""
    folder, name = posixpath.split(path)
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == folder), None)
    assert mount is not None, f"{container['name']}: nothing mounted at {folder}"
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    secret = volume["secret"]
    (item,) = [i for i in secret["items"] if i["path"] == name]
    return secret["secretName"], item["key"]


@pytest.mark.parametrize("target", ["base", *STUDIES])
def test_every_qsens_process_reads_the_loader_token(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    """Loaders (and their init containers), workers, the judge and the Jobs that run qsens all
    get QSENS_LOADER_TOKEN_FILE naming the key `token` of the Secret qsens-loader-token."""
    docs = renders[target]
    (secret,) = [
        s
        for s in of_kind(docs, "Secret")
        if s["metadata"]["name"].startswith("qsens-loader-token-")
    ]
    token = data_of(secret)["token"]
    assert len(token) >= 32 and token.isalnum(), "a generated random token"
    seen = set()
    for pod in pods(docs):
        for c in pod.containers():
            if not is_qsens(c):
                continue
            env = container_env(docs, c)
            assert "QSENS_LOADER_TOKEN" not in env, "the token comes from the file only"
            name, key = _mounted_file(pod.spec, c, env["QSENS_LOADER_TOKEN_FILE"])
            assert (name, key) == (secret["metadata"]["name"], "token"), (pod.name, c["name"])
            seen.add(pod.labels["app.kubernetes.io/component"])
    workers = {"extractor", "steerer", "analyzer", "judge", "quantizer"}
    assert workers | ({"loader"} if target != "base" else set()) <= seen
