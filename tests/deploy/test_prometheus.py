"""Metrics: the rules pass promtool's checks and unit tests, name metrics and queues that
exist, and the Prometheus Operator copy and the plain scrape config agree with them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from services.common.natsconn import PlaneNames
from services.common.settings import NatsSettings
from tests.deploy.manifests import DEPLOY, REPO, find, of_kind, pods, tool

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "qsens.rules.yml"


def _promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_rules_check() -> None:
    out = _promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_unit_tests() -> None:
    out = _promtool("test", "rules", "qsens.rules.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests depend on the rules: with the DLQ stream misnamed they fail."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace('"QSENS_DLQ"', '"DLQ"'))
    (tmp_path / "qsens.rules.test.yml").write_text(
        (PROMETHEUS / "qsens.rules.test.yml").read_text()
    )
    out = _promtool("test", "rules", "qsens.rules.test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "QsensDeadLetters" in out.stdout + out.stderr


def test_scrape_config(tmp_path: Path) -> None:
    """promtool checks the scrape config (relabelling, rule files). Debian's promtool is built
    without Kubernetes service discovery, so the pod discovery block is checked by hand and
    swapped for a static target for promtool."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["qsens"]
    job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    assert config["rule_files"] == [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config_follows_the_annotations(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The relabelling reads the annotations and labels the manifests set."""
    job = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    sources = {s for r in job["relabel_configs"] for s in r.get("source_labels", [])}
    targets = {r.get("target_label") for r in job["relabel_configs"]}

    def meta(kind: str, key: str) -> str:
        return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)

    for pod in pods(renders["example-study"]):
        for key in pod.annotations:
            if key.startswith("prometheus.io/"):
                assert meta("annotation", key) in sources, key
    for key in ("app.kubernetes.io/component", "qsens.io/model", "qsens.io/precision"):
        assert meta("label", key) in sources, key
    assert {"namespace", "pod", "component", "qsens_model", "qsens_precision"} <= targets
    # The address rewrite puts the annotated port on the pod's address (RE2 and re agree here).
    rewrite = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    joined = "10.1.2.3:4222;7777"
    result = re.sub(
        "^(?:" + rewrite["regex"] + ")$", rewrite["replacement"].replace("$", "\\"), joined
    )
    assert result == "10.1.2.3:7777"


def test_operator_copy_equals_the_rules(renders: dict[str, list[dict[str, Any]]]) -> None:
    rule = find(renders["example-study"], "PrometheusRule", "qsens")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_pod_monitors_reach_every_metrics_port(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Each long-running pod that Prometheus scrapes by annotation is also selected by a
    PodMonitor on a port it has, with the same target labels."""
    docs = renders["example-study"]
    monitors = of_kind(docs, "PodMonitor")
    plain = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    plain_targets = {r["target_label"] for r in plain["relabel_configs"] if "target_label" in r}
    for pod in pods(docs):
        if pod.annotations.get("prometheus.io/scrape") != "true":
            continue
        ports = {
            p["name"]: p["containerPort"] for c in pod.containers() for p in c.get("ports", [])
        }
        hits = [
            (m, e)
            for m in monitors
            if m["spec"]["selector"]["matchLabels"].items() <= pod.labels.items()
            for e in m["spec"]["podMetricsEndpoints"]
            if e["port"] in ports
        ]
        assert len(hits) == 1, pod.name
        monitor, endpoint = hits[0]
        assert ports[endpoint["port"]] == int(pod.annotations["prometheus.io/port"]), pod.name
        assert endpoint["path"] == pod.annotations["prometheus.io/path"], pod.name
        labels = {r["targetLabel"] for r in endpoint.get("relabelings", [])}
        assert "component" in labels and labels <= plain_targets, monitor["metadata"]["name"]


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_rules_name_the_real_streams_and_consumers(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["example-study"]
    common = next(
        d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("qsens-common-")
    )
    namespace = common["data"].get(
        "QSENS_NATS_NAMESPACE", NatsSettings.model_fields["namespace"].default
    )
    names = PlaneNames(namespace)
    text = "\n".join(_rule_exprs())
    streams = set(re.findall(r'stream_name="([^"]+)"', text))
    assert streams == {names.dlq_stream}
    for pattern in re.findall(r'consumer_name=~"([^"]+)"', text):
        assert re.fullmatch(pattern, names.consumer("extract")), pattern


def test_rules_use_metrics_the_services_export() -> None:
    """qsens_* metric names in the rules are registered somewhere under services/."""
    source = "\n".join(p.read_text() for p in (REPO / "services").rglob("*.py"))
    exported = set(re.findall(r'"(qsens_[a-z_]+)"', source))
    # A metric is a name followed by a selector or a range; labels (qsens_model) are not.
    used = set(
        re.findall(r"\b(qsens_[a-z_]+?)(?:_bucket|_sum|_count)?[\[{]", "\n".join(_rule_exprs()))
    )
    assert used, "no qsens metric found in the rules"
    for metric in used:
        base = metric.removesuffix("_total")
        assert metric in exported or base in exported or f"{base}_total" in exported, metric


def test_operator_objects_carry_the_release_label(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    """kube-prometheus-stack's Prometheus selects PodMonitors and PrometheusRules by the label
    `release: <Helm release>` (by default): every one carries it."""
    docs = renders["example-study"]
    objects = of_kind(docs, "PodMonitor") + of_kind(docs, "PrometheusRule")
    assert len(objects) >= 3
    for obj in objects:
        assert obj["metadata"]["labels"].get("release") == "kube-prometheus-stack", obj["kind"]
