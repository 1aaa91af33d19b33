"""The Grafana dashboards load, filter by datasource/pool/pod, and every PromQL query parses.

There is no Grafana server to import them into here, so each dashboard is checked as Grafana's JSON
model and its queries go through promtool, the Prometheus parser: the Grafana variables are
substituted the way Grafana would before a query reaches Prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import encoder, plugins
from grafana_foundation_sdk.models import dashboard as dashboard_model
from tests.chart import charting

from lorafleet_gateway.metrics import GatewayMetrics

# Lets the decoder pick the Prometheus query model for targets whose datasource type is prometheus.
plugins.register_default_plugins()
DASHBOARDS = sorted((charting.CHART / "dashboards").glob("*.json"))
DESIGN_METRICS = {
    f"lorafleet_trainer_{name}"
    for name in [
        "cache_entries",
        "cache_bytes",
        "cache_capacity_bytes",
        "cache_hits_total",
        "cache_misses_total",
        "cache_evictions_total",
        "storage_read_bytes_total",
        "storage_write_bytes_total",
        "step_duration_seconds",
        "step_phase_duration_seconds",
        "steps_total",
        "tokens_total",
        "queue_depth",
        "gpu_memory_allocated_bytes",
        "gpu_memory_reserved_bytes",
        "gpu_memory_peak_bytes",
        "gpu_memory_after_step_bytes",
        "host_pinned_bytes",
        # Publishing to inference servers (issue 14; DESIGN.md lists serving as coming).
        "publish_duration_seconds",
        "publish_failures_total",
        "publish_lag_seconds",
        # Fused steps across adapters (issue 28): a contract addition the README names.
        "step_fused_adapters",
    ]
} | {
    f"lorafleet_operator_{name}"
    for name in [
        "adapters",
        "placements_total",
        "reschedules_total",
        "evictions_total",
        "reconcile_duration_seconds",
        "reconcile_errors_total",
        "trainer_requests_total",
    ]
}
# The gateway's (issue 27), as prometheus_client exposes them (counters end in _total).
DESIGN_METRICS |= {
    f"lorafleet_gateway_{name}"
    for name in [
        "requests_total",
        "upstream_seconds",
        "routing_decisions_total",
        "record_lookups_total",
        "feedback_seconds",
        "feedback_replayed_total",
    ]
}
# The `job` of each dashboard's series (the chart's PodMonitor and ServiceMonitors relabel it).
JOBS = {
    "trainers.json": "lorafleet-trainer",
    "operator.json": "lorafleet-operator",
    "gateway.json": "lorafleet-gateway",
}


def load(path: Path) -> dict[str, Any]:
    return charting.dashboard(path.name)


def all_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every panel."""
    return [
        (path.name, panel["title"], target["expr"])
        for path in DASHBOARDS
        for panel in load(path)["panels"]
        for target in panel["targets"]
    ]


def variable_selectors() -> list[str]:
    """The series selectors inside the filters' label_values(<selector>, <label>) queries."""
    selectors = []
    for path in DASHBOARDS:
        for variable in load(path)["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
                assert match, variable["query"]["query"]
                selectors.append(match.group(1))
    return selectors


def test_every_dashboard_exists_and_is_fresh() -> None:
    assert [p.name for p in DASHBOARDS] == ["gateway.json", "operator.json", "trainers.json"]
    done = subprocess.run(
        [sys.executable, str(charting.ROOT / "scripts" / "render_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_readme_describes_every_panel() -> None:
    done = subprocess.run(
        [sys.executable, str(charting.ROOT / "scripts" / "render_dashboards.py"), "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    )
    readme = (charting.ROOT / "README.md").read_text(encoding="utf-8")
    assert done.stdout.strip() in readme, (
        "README's panel table is stale: paste `render_dashboards.py --markdown`"
    )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_model(path: Path) -> None:
    board = load(path)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pod"]["multi"] and variables["pod"]["includeAll"]
    job = f'job="{JOBS[path.name]}"'
    assert job in variables["pod"]["query"]["query"], "the pod filter lists another component's pods"
    if path.name != "trainers.json":
        assert variables["pod"]["query"]["query"] == f"label_values(up{{{job}}}, pod)"
    if path.name == "trainers.json":
        assert variables["pool"]["multi"] and variables["pool"]["includeAll"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "$pod" in target["expr"], f"{panel['title']} ignores the pod filter"
            # Every selector of the query, not only one of them, is the component's and the pods'.
            selectors = re.findall(r"\w\{([^}]*)\}", target["expr"])
            assert selectors, target["expr"]
            for selector in selectors:
                assert selector.startswith(job) and 'pod=~"$pod"' in selector, f"{panel['title']}: {selector}"
            if path.name == "trainers.json":
                assert "$pool" in target["expr"], f"{panel['title']} ignores the pool filter"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_grafana_dashboard_model_loads_it_without_losing_anything(path: Path) -> None:
    # Grafana's schema-generated model (grafana-foundation-sdk) decodes the dashboard; a key it does
    # not know, or a panel or query of the wrong shape, would be dropped or changed on the way back.
    original = load(path)
    model = dashboard_model.Dashboard.from_json(original)
    panels = model.panels or []
    assert all(isinstance(p, dashboard_model.Panel) for p in panels), "only plain panels, no rows"
    queries = [q for p in panels if isinstance(p, dashboard_model.Panel) for q in p.targets or []]
    # Decoded as Prometheus queries, so Grafana will hand them to a Prometheus datasource.
    assert [type(q).__module__.rsplit(".", 1)[-1] for q in queries] == ["prometheus"] * sum(
        len(p["targets"]) for p in original["panels"]
    )
    round_trip = json.loads(json.dumps(model, cls=encoder.JSONEncoder))
    lost = lost_on_round_trip(original, round_trip)
    assert not lost, f"Grafana's model drops or changes: {lost}"


def lost_on_round_trip(original: Any, decoded: Any, path: str = "") -> list[str]:
    """Paths of the original that the decoded copy lacks or changed (defaults it adds are fine)."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            return [path]
        return [
            lost
            for key, value in original.items()
            for lost in (
                [f"{path}/{key}"]
                if key not in decoded
                else lost_on_round_trip(value, decoded[key], f"{path}/{key}")
            )
        ]
    if isinstance(original, list):
        if not isinstance(decoded, list) or len(decoded) != len(original):
            return [path]
        return [
            lost
            for i, (a, b) in enumerate(zip(original, decoded, strict=True))
            for lost in lost_on_round_trip(a, b, f"{path}/{i}")
        ]
    return [] if original == decoded else [path]


def test_every_query_uses_design_metric_names() -> None:
    used = set()
    for _, title, expr in all_queries():
        for name in re.findall(r"\b(lorafleet_\w+?)(?:_bucket|_sum|_count)?\{", expr):
            assert name in DESIGN_METRICS, f"{title}: {name} is not a DESIGN.md metric"
            used.add(name)
    # Every trainer metric of the contract is drawn somewhere (the operator's and the gateway's too).
    assert used == DESIGN_METRICS, f"not on any panel: {sorted(DESIGN_METRICS - used)}"


def test_the_gateway_metrics_are_the_ones_it_exposes() -> None:
    # prometheus_client names a counter's samples <name>_total; a histogram's family keeps its name.
    exposed = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in GatewayMetrics().registry.collect()
    }
    assert exposed == {name for name in DESIGN_METRICS if name.startswith("lorafleet_gateway_")}


def test_every_query_parses(tmp_path: Path) -> None:
    # promtool parses every expression of a rules file; each query becomes a recording rule.
    exprs = [charting.substitute(expr) for _, _, expr in all_queries()] + variable_selectors()
    rules = {
        "groups": [
            {"name": "dashboards", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = charting.promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_a_broken_query_would_be_caught(tmp_path: Path) -> None:
    # The parse check above is only worth something if promtool rejects a malformed query.
    path = tmp_path / "broken.rules.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "q", "expr": "sum by (pod (x)"}]}]})
    )
    assert charting.promtool("check", "rules", str(path)).returncode != 0
