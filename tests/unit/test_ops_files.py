"""The shipped ops files: the Grafana dashboard and the Prometheus alerts query only what the router exports.

Every PromQL expression is parsed and each metric it selects must be a series the router's registry
serves, so renaming a metric in ops/metrics.py fails here instead of leaving an empty panel or an alert
that can never fire. promtool checks the rules and runs their unit tests (alerts_test.yml).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from ruamel.yaml import YAML

from ops import metrics

REPO = Path(__file__).resolve().parents[2]
OPS = Path(metrics.__file__).resolve().parent
DASHBOARD = OPS / "grafana" / "router.json"
ALERTS = OPS / "prometheus" / "alerts.yml"
ALERT_TESTS = OPS / "prometheus" / "alerts_test.yml"

SERIES_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
"""The sample names each metric type is scraped as (``*_created`` is disabled in ops/metrics.py)."""

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
GRAFANA_INTERVALS = {"__rate_interval", "__interval", "__range"}

LABEL_VALUES = re.compile(r"label_values\((\w+),\s*(\w+)\)")

WATCHED = {
    "router_events_transformed_total": "throughput per route",
    "router_events_delivered_total": "throughput per target",
    "router_event_lag_seconds_bucket": "lag percentiles",
    "router_delivery_attempts_total": "delivery errors and retries",
    "router_deadletters_total": "dead letters created",
    "router_deadletters_open": "dead letters open",
    "router_parked_keys": "parked keys",
    "router_queue_depth": "queue depth",
    "router_source_up": "source up",
    "router_circuit_open": "circuit open",
    "router_webhook_rejections_total": "webhook rejections",
}
"""Metric -> what the operator watches with it; the dashboard must have a panel on each."""


def exported_series() -> set[str]:
    """Every sample name the router's registry can serve at ``GET /metrics``."""
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        assert family.type in SERIES_SUFFIXES, f"{family.name}: no series suffixes known for {family.type}"
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
    return names


def as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: interval macros become a duration, other variables a word."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name in GRAFANA_INTERVALS else "x"

    return GRAFANA_VARIABLE.sub(substitute, expr)


def selected_metrics(expr: str) -> set[str]:
    """The metric names an expression selects; an unnamed selector (``{__name__=~...}``) fails."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if not isinstance(node, promql_parser.VectorSelector):
            return
        if node.name is not None:
            names.add(node.name)
            return
        exact = [
            m.value
            for m in node.matchers.matchers
            if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
        ]
        assert exact, f"{expr!r}: a selector without a metric name cannot be checked"
        names.update(exact)

    promql_parser.walk(promql_parser.parse(as_promql(expr)), pre_visit=visit)
    return names


def unknown_metrics(expr: str) -> set[str]:
    """The metrics an expression selects that the router does not export."""
    return selected_metrics(expr) - exported_series()


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel query."""
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} query {target['refId']}", target["expr"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_dashboard_has_the_shape_grafana_imports() -> None:
    dashboard = load_dashboard()

    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["id"] is None, "an exported dashboard carries no database id"
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["time"], dict) and {"from", "to"} <= dashboard["time"].keys()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("route", "target"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["multi"] and variables[name]["includeAll"]
        found = LABEL_VALUES.fullmatch(variables[name]["query"]["query"])
        assert found is not None and found.group(2) == name, variables[name]["query"]
        assert found.group(1) in exported_series(), f"variable {name}: {found.group(1)} is not exported"


def test_every_panel_has_a_title_a_unique_id_a_datasource_and_a_place() -> None:
    panels = list(dashboard_panels(load_dashboard()))

    ids = [panel["id"] for panel in panels]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":  # a row only groups panels: it queries nothing
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"], panel["title"]


def test_dashboard_queries_only_metrics_the_router_exports() -> None:
    for where, expr in dashboard_queries(load_dashboard()):
        assert selected_metrics(expr), f"{where} selects no metric: {expr}"
        assert not unknown_metrics(expr), f"{where} queries metrics the router does not export: {expr}"


def test_dashboard_has_a_panel_for_everything_operators_watch() -> None:
    queried = set().union(*(selected_metrics(expr) for _, expr in dashboard_queries(load_dashboard())))

    missing = {metric: what for metric, what in WATCHED.items() if metric not in queried}

    assert not missing


def test_alerts_query_only_metrics_the_router_exports() -> None:
    rules = alert_rules()

    assert rules
    for rule in rules:
        assert selected_metrics(rule["expr"]), f"alert {rule['alert']} selects no metric"
        assert not unknown_metrics(rule["expr"]), f"alert {rule['alert']}: {rule['expr']}"


def test_a_renamed_metric_is_reported() -> None:
    assert unknown_metrics("sum by (route) (router_deadletter_open) > 0") == {"router_deadletter_open"}
    assert unknown_metrics('rate(router_event_lag_bucket{target=~"$target"}[$__rate_interval])') == {
        "router_event_lag_bucket"
    }
    assert unknown_metrics("router_queue_depth_total") == {"router_queue_depth_total"}
    assert not unknown_metrics('{__name__="router_parked_keys"} + router_delivery_seconds_count')


def test_every_alert_is_unit_tested_and_explained_in_the_operations_doc() -> None:
    alerts = {rule["alert"] for rule in alert_rules()}
    fired = {
        case["alertname"]
        for test in load_yaml(ALERT_TESTS)["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    operations = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")

    assert alerts == fired
    assert {alert for alert in alerts if f"`{alert}`" not in operations} == set()
    assert "ops/prometheus/alerts.yml" in operations and "ops/grafana/router.json" in operations


def test_ops_files_are_package_data() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    patterns = setup["options.package_data"]["ops"].split()

    for path in (DASHBOARD, ALERTS, ALERT_TESTS):
        relative = path.relative_to(OPS).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), f"{relative} is not package data"


@pytest.fixture
def promtool() -> str:
    """promtool from Debian's prometheus package: required in CI, skipped without it elsewhere."""
    found = shutil.which("promtool")
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is not installed (CI must install the prometheus package)")
    pytest.skip("promtool is not installed (apt-get install prometheus)")


@pytest.mark.parametrize(
    "command",
    [("check", "rules", ALERTS), ("test", "rules", ALERT_TESTS)],
    ids=["check-rules", "test-rules"],
)
def test_promtool_accepts_the_alerts(promtool: str, command: tuple[str, str, Path]) -> None:
    done = subprocess.run(
        [promtool, *map(str, command)], capture_output=True, text=True, timeout=120, check=False
    )

    assert done.returncode == 0, done.stdout + done.stderr
