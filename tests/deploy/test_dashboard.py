"""The Grafana dashboard (deploy/grafana/qsens-dashboard.json) is valid and queries what
exists: every qsens_* metric it names is defined by a prometheus-client metric in services/,
every qsens:* series is a recording rule of deploy/prometheus/qsens.rules.yml, NATS metrics
are the exporter's that the rules already use, GPU metrics are dcgm-exporter's default
counters, every query parses (promtool), and every variable it uses is defined."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, REPO, tool

DASHBOARD = DEPLOY / "grafana" / "qsens-dashboard.json"
RULES = DEPLOY / "prometheus" / "qsens.rules.yml"
# dcgm-exporter's default counters (etc/default-counters.csv) the dashboard may use.
DCGM_DEFAULTS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
}
# Grafana's own variables.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}
# What a query's variables become for promtool.
SUBSTITUTE = {
    "$__rate_interval": "5m",
    "$namespace": "qsens",
    "$model": ".+",
    "$precision": ".+",
    "$dcgm_pod_label": "exported_pod",
}
_DEFINITION = re.compile(
    r'\b(Counter|Gauge|Histogram|Summary|memory_gauge)\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"'
)
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "le", "inf", "nan",
}  # fmt: skip


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query."""
    return [
        (p["title"], t["expr"])
        for p in _dashboard()["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def exported_metrics() -> set[str]:
    """Series names the services export: each prometheus-client definition under services/,
    with the suffixes the client adds (_total for counters, _bucket/_sum/_count)."""
    names: set[str] = set()
    for path in (REPO / "services").rglob("*.py"):
        for kind, name in _DEFINITION.findall(path.read_text()):
            base = name.removesuffix("_total")
            if kind == "Counter":
                names.update({base + "_total", base + "_created"})
            elif kind in ("Histogram", "Summary"):
                names.update({name + s for s in ("_bucket", "_sum", "_count", "_created")})
            else:
                names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression selects: identifiers outside strings, label matchers,
    grouping clauses, and that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match.group(0)
        after = text[match.end() :].lstrip()
        if after.startswith("(") or name.lower() in _KEYWORDS or name.startswith("$"):
            continue
        if text[max(0, match.start() - 1)] == "$":
            continue
        names.add(name)
    return names


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def _rule_metrics() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {n for g in groups for r in g["rules"] for n in metric_names(r["expr"])}


def unknown_metrics(expr: str) -> set[str]:
    known = exported_metrics() | _recorded() | DCGM_DEFAULTS | {"up"}
    nats = {n for n in _rule_metrics() if n.startswith("jetstream_")}
    return metric_names(expr) - known - nats


def test_dashboard_is_valid() -> None:
    dash = _dashboard()
    assert dash["uid"] == "qsens-overview" and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
    assert len(_queries()) >= 20


def test_queries_name_metrics_that_exist() -> None:
    exported = exported_metrics()
    # The helper reads the services' definitions (a few known ones, so it cannot be empty).
    assert {"qsens_loader_requests_total", "qsens_loader_request_seconds_bucket"} <= exported
    used: set[str] = set()
    for title, expr in _queries():
        assert not unknown_metrics(expr), f"{title}: {unknown_metrics(expr)}"
        used |= metric_names(expr)
    # It covers the services' own metrics and the GPUs.
    assert any(n.startswith("qsens_loader_") for n in used)
    assert any(n.startswith("qsens_judge_") or n.startswith("qsens:judge") for n in used)
    assert {n for n in used if n.startswith("DCGM_")} >= {
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
    }


def test_metric_checker_catches_a_wrong_name() -> None:
    assert unknown_metrics('rate(qsens_loader_request_total{rpc="Generate"}[5m])') == {
        "qsens_loader_request_total"
    }
    assert unknown_metrics("DCGM_FI_DEV_NOT_A_COUNTER") == {"DCGM_FI_DEV_NOT_A_COUNTER"}
    expr = 'sum by (qsens_model) (label_replace(up, "a", "$1", "b", "(.+)"))'
    assert metric_names(expr) == {"up"}


def test_gpu_panels_are_per_variant() -> None:
    """DCGM series are joined to the loaders' variant labels (qsens_model, qsens_precision)."""
    gpu = [(t, e) for t, e in _queries() if "DCGM_" in e]
    assert len(gpu) >= 4
    for title, expr in gpu:
        assert "group_left (qsens_model, qsens_precision)" in expr, title
        assert re.search(r"by \(qsens_model, qsens_precision\)", expr), title
    # The labels the join uses are target labels of the scrape config.
    job = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {r.get("target_label") for r in job["scrape_configs"][0]["relabel_configs"]}
    assert {"qsens_model", "qsens_precision", "component", "namespace", "pod"} <= targets


def test_variables_are_defined() -> None:
    dash = _dashboard()
    defined = {v["name"] for v in dash["templating"]["list"]} | BUILTIN_VARIABLES
    text = DASHBOARD.read_text()
    used = set(re.findall(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)", text))
    assert used <= defined, used - defined
    assert {"datasource", "namespace", "model", "precision"} <= defined


def test_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query (variables substituted as Grafana would)."""
    rules = []
    for i, (_, expr) in enumerate(_queries()):
        for var, value in SUBSTITUTE.items():
            expr = expr.replace(var, value)
        assert "$" not in expr.replace('"$1"', ""), expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("bad", ["sum(rate(qsens_loader_requests_total[5m])", "up{"])
def test_promtool_refuses_broken_queries(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": bad}]}]})
    )
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
