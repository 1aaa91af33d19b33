"""Render LoraFleet's Grafana dashboards from one panel list into charts/lorafleet/dashboards/*.json.

The dashboards are declared here as data (title, PromQL, unit) and rendered into Grafana's JSON
model, so every panel gets the same datasource, filters and layout. `--check` fails when the
committed JSON differs from what this renders; `--markdown` prints the panel-by-panel summary that
the README carries.

Usage: python scripts/render_dashboards.py [--check | --markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent.parent / "charts" / "lorafleet" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every trainer query is narrowed by the dashboard's pool and pod filters.
TRAINER = '{job="lorafleet-trainer", pool=~"$pool", pod=~"$pod"}'
OPERATOR = '{job="lorafleet-operator", pod=~"$pod"}'
GATEWAY = 'job="lorafleet-gateway", pod=~"$pod"'
RATE = "$__rate_interval"
PHASE = "lorafleet_trainer_step_phase_duration_seconds"


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel and the legend of its series."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A time-series panel: what it shows (for the README) and the queries that draw it."""

    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 12
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def trainer_panels() -> list[Panel]:
    """The Trainers dashboard: cache health, step latency, storage traffic and memory per pod."""
    hits = f"sum by (pod) (rate(lorafleet_trainer_cache_hits_total{TRAINER}[{RATE}]))"
    misses = f"sum by (pod) (rate(lorafleet_trainer_cache_misses_total{TRAINER}[{RATE}]))"
    return [
        Panel(
            "Cache hit ratio",
            "Share of steps whose adapter was already in the pod's CPU cache (no disk restore).",
            "percentunit",
            (Query(f"{hits} / ({hits} + {misses})", "{{pod}}"),),
            extra={"min": 0, "max": 1},
        ),
        Panel(
            "Cache bytes against capacity",
            "Host memory held by cached LoRA weights and AdamW state, and each pod's cache capacity.",
            "bytes",
            (
                Query(f"sum by (pod) (lorafleet_trainer_cache_bytes{TRAINER})", "{{pod}} used"),
                Query(f"max by (pod) (lorafleet_trainer_cache_capacity_bytes{TRAINER})", "{{pod}} capacity"),
            ),
        ),
        Panel(
            "Cached adapters",
            "Adapters whose state is in each pod's CPU cache.",
            "short",
            (Query(f"sum by (pod) (lorafleet_trainer_cache_entries{TRAINER})", "{{pod}}"),),
        ),
        Panel(
            "Cache evictions by reason",
            "Entries leaving the cache: lru (full), explicit (operator), invalidated (new epoch), deleted.",
            "ops",
            (
                Query(
                    f"sum by (reason) (rate(lorafleet_trainer_cache_evictions_total{TRAINER}[{RATE}]))",
                    "{{reason}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            "Step latency p50 / p95 by cache hit and miss",
            "Server-side duration of one distill step; a miss pays the adapter restore from storage.",
            "s",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le, cache) "
                    f"(rate(lorafleet_trainer_step_duration_seconds_bucket{TRAINER}[{RATE}])))",
                    f"p{int(q * 100)} {{{{cache}}}}",
                )
                for q in (0.5, 0.95)
            ),
        ),
        Panel(
            "Mean time per step phase",
            "Average seconds per step spent queueing, restoring, computing, snapshotting and persisting.",
            "s",
            (
                Query(
                    f"sum by (phase) (rate({PHASE}_sum{TRAINER}[{RATE}]))"
                    f" / sum by (phase) (rate({PHASE}_count{TRAINER}[{RATE}]))",
                    "{{phase}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            "Adapter storage read and write",
            "Bytes per second read from and written to the adapter store; warm steps read nothing.",
            "Bps",
            (
                Query(
                    f"sum by (pod) (rate(lorafleet_trainer_storage_read_bytes_total{TRAINER}[{RATE}]))",
                    "{{pod}} read",
                ),
                Query(
                    f"sum by (pod) (rate(lorafleet_trainer_storage_write_bytes_total{TRAINER}[{RATE}]))",
                    "{{pod}} write",
                ),
            ),
        ),
        Panel(
            "GPU memory allocated and reserved",
            "CUDA memory per pod. 'after step' is measured right after each step: in offload mode it "
            "stays at the pod's floor (nothing is held between steps); live figures are mostly "
            "scraped mid-step.",
            "bytes",
            (
                Query(
                    f"max by (pod) (lorafleet_trainer_gpu_memory_allocated_bytes{TRAINER})",
                    "{{pod}} allocated",
                ),
                Query(
                    f"max by (pod) (lorafleet_trainer_gpu_memory_reserved_bytes{TRAINER})", "{{pod}} reserved"
                ),
                Query(f"max by (pod) (lorafleet_trainer_gpu_memory_peak_bytes{TRAINER})", "{{pod}} peak"),
                Query(
                    f"max by (pod) (lorafleet_trainer_gpu_memory_after_step_bytes{TRAINER})",
                    "{{pod}} after step",
                ),
            ),
        ),
        Panel(
            "Process RSS and pinned host memory",
            "Resident memory of the trainer process and the page-locked buffers used for host-GPU copies.",
            "bytes",
            (
                Query(f"max by (pod) (process_resident_memory_bytes{TRAINER})", "{{pod}} RSS"),
                Query(f"max by (pod) (lorafleet_trainer_host_pinned_bytes{TRAINER})", "{{pod}} pinned"),
            ),
        ),
        Panel(
            "Queue depth",
            "Steps waiting for the pod's single training worker; a full queue answers 429.",
            "short",
            (Query(f"max by (pod) (lorafleet_trainer_queue_depth{TRAINER})", "{{pod}}"),),
        ),
        Panel(
            "Steps by outcome",
            "Distill steps per second, by how they ended.",
            "ops",
            (
                Query(
                    f"sum by (outcome) (rate(lorafleet_trainer_steps_total{TRAINER}[{RATE}]))", "{{outcome}}"
                ),
            ),
            stack=True,
        ),
        Panel(
            "Tokens trained",
            "Tokens processed per second by each pod.",
            "short",
            (Query(f"sum by (pod) (rate(lorafleet_trainer_tokens_total{TRAINER}[{RATE}]))", "{{pod}}"),),
        ),
        Panel(
            "Adapters per fused step",
            "How many adapters' steps shared one forward and backward, on average per committed step "
            "(1: every step ran alone; steps of one LoRA shape that wait together are fused, up to "
            "--fuse-steps).",
            "short",
            (
                Query(
                    f"sum by (pod) (rate(lorafleet_trainer_step_fused_adapters_sum{TRAINER}[{RATE}])) / "
                    f"sum by (pod) (rate(lorafleet_trainer_step_fused_adapters_count{TRAINER}[{RATE}]))",
                    "{{pod}}",
                ),
            ),
        ),
        Panel(
            "Publish latency to inference servers",
            "Time from a version's commit until a vLLM server serves it (p50 and p95 over all servers).",
            "s",
            (
                Query(
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(lorafleet_trainer_publish_duration_seconds_bucket{TRAINER}[{RATE}])))",
                    "p50",
                ),
                Query(
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(lorafleet_trainer_publish_duration_seconds_bucket{TRAINER}[{RATE}])))",
                    "p95",
                ),
            ),
        ),
        Panel(
            "Served lag and publish failures",
            "How long the oldest committed version no server serves has waited, and failed server "
            "calls per second by reason (unreachable, timeout, refused, server_error).",
            "s",
            (
                Query(f"max by (pod) (lorafleet_trainer_publish_lag_seconds{TRAINER})", "{{pod}} lag"),
                Query(
                    f"sum by (reason) (rate(lorafleet_trainer_publish_failures_total{TRAINER}[{RATE}]))",
                    "failures: {{reason}}",
                ),
            ),
        ),
    ]


def operator_panels() -> list[Panel]:
    """The Operator dashboard: adapter phases, placement activity, evictions and reconcile health."""
    return [
        Panel(
            "Adapters by phase",
            "LoraAdapters per phase; anything but Ready for long is what the AdaptersNotReady alert watches.",
            "short",
            (Query(f"sum by (phase) (lorafleet_operator_adapters{OPERATOR})", "{{phase}}"),),
            stack=True,
        ),
        Panel(
            "Placements and re-placements",
            "Adapters placed on a pod, and adapters moved because their pod went away (a new epoch).",
            "ops",
            (
                Query(f"sum (rate(lorafleet_operator_placements_total{OPERATOR}[{RATE}]))", "placements"),
                Query(f"sum (rate(lorafleet_operator_reschedules_total{OPERATOR}[{RATE}]))", "re-placements"),
            ),
        ),
        Panel(
            "Cache evictions on delete by outcome",
            "Finalizer calls that evict a deleted adapter's cache entry, by how they ended.",
            "ops",
            (
                Query(
                    f"sum by (outcome) (rate(lorafleet_operator_evictions_total{OPERATOR}[{RATE}]))",
                    "{{outcome}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            "Reconcile latency p50 / p95",
            "Duration of one reconcile of a TrainerPool or LoraAdapter.",
            "s",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(lorafleet_operator_reconcile_duration_seconds_bucket{OPERATOR}[{RATE}])))",
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.95)
            ),
        ),
        Panel(
            "Reconcile errors",
            "Reconciles that raised and will be retried.",
            "ops",
            (Query(f"sum (rate(lorafleet_operator_reconcile_errors_total{OPERATOR}[{RATE}]))", "errors"),),
        ),
        Panel(
            "Trainer API calls by route and code",
            "Calls the operator makes to trainer pods (init, evict, state), by route and HTTP status.",
            "ops",
            (
                Query(
                    f"sum by (route, code) "
                    f"(rate(lorafleet_operator_trainer_requests_total{OPERATOR}[{RATE}]))",
                    "{{route}} {{code}}",
                ),
            ),
            stack=True,
        ),
    ]


def gateway(*matchers: str) -> str:
    """The gateway's selector, narrowed by the pod filter and any further ``label="value"``."""
    return "{" + ", ".join((GATEWAY, *matchers)) + "}"


def gateway_panels() -> list[Panel]:
    """The Gateway dashboard: what is asked, of which adapter, how fast upstreams answer, feedback."""
    requests = "lorafleet_gateway_requests_total"
    chats = gateway('route=~"/v1/chat/completions|/v1/completions"', 'model!=""')
    failed = gateway('route="/v1/feedback"', 'code!~"2.."')
    lookups = "lorafleet_gateway_record_lookups_total"
    hit = gateway('result="hit"')
    hits = f"sum by (pod) (rate({lookups}{hit}[{RATE}]))"
    return [
        Panel(
            "Requests by route and code",
            "Answers per second by route (the matched route; unmatched for any other path) and HTTP status.",
            "reqps",
            (Query(f"sum by (route, code) (rate({requests}{gateway()}[{RATE}]))", "{{route}} {{code}}"),),
            width=24,
            stack=True,
        ),
        Panel(
            "Chat requests by adapter",
            "Chat and completion requests per second by the adapter (namespace/adapter) they resolved to.",
            "reqps",
            (Query(f"sum by (model) (rate({requests}{chats}[{RATE}]))", "{{model}}"),),
            stack=True,
        ),
        Panel(
            "Upstream latency p50 / p95 by route",
            "Time to an upstream's answer: an inference server's (chat/completions, completions) or a "
            "trainer's (score, distill).",
            "s",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le, route) "
                    f"(rate(lorafleet_gateway_upstream_seconds_bucket{gateway()}[{RATE}])))",
                    f"p{int(q * 100)} {{{{route}}}}",
                )
                for q in (0.5, 0.95)
            ),
        ),
        Panel(
            "Feedback to new version p50 / p95",
            "From a feedback's arrival to the answer naming its new version (scoring and the step in it).",
            "s",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(lorafleet_gateway_feedback_seconds_bucket{gateway()}[{RATE}])))",
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.95)
            ),
        ),
        Panel(
            "Routing decisions",
            "Chats sent to a server with the adapter's latest version, to one with an older version "
            "(none had the latest in time), or to none (answered 503).",
            "ops",
            (
                Query(
                    f"sum by (decision) (rate(lorafleet_gateway_routing_decisions_total{gateway()}[{RATE}]))",
                    "{{decision}}",
                ),
            ),
            stack=True,
        ),
        Panel(
            "Completion record hit ratio",
            "Share of feedback samples each replica found in its record of what it served (vLLM's own "
            "log-probs); a miss is scored on the trainer first.",
            "percentunit",
            (Query(f"{hits} / sum by (pod) (rate({lookups}{gateway()}[{RATE}]))", "{{pod}}"),),
            extra={"min": 0, "max": 1},
        ),
        Panel(
            "Feedback errors and replayed steps",
            "Feedback answered with an error, by HTTP status (5xx is what the GatewayFeedbackFailing "
            "alert watches), and steps answered from an earlier one with the same idempotency key.",
            "ops",
            (
                Query(f"sum by (code) (rate({requests}{failed}[{RATE}]))", "{{code}}"),
                Query(
                    f"sum (rate(lorafleet_gateway_feedback_replayed_total{gateway()}[{RATE}]))", "replayed"
                ),
            ),
        ),
    ]


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-select filter whose values come from a label of a metric."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def render_panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    """Grafana's JSON model of one time-series panel at grid position (x, y)."""
    defaults: dict[str, Any] = {"unit": panel.unit, **panel.extra}
    if panel.stack:
        defaults["custom"] = {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 20}
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": 8},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
    }


def render(uid: str, title: str, panels: list[Panel], variables: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole dashboard: datasource variable first, then the filters, then panels two per row."""
    rendered, x, y = [], 0, 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        rendered.append(render_panel(panel, panel_id, x, y))
        x += panel.width
    datasource_var = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "refresh": 1,
    }
    return {
        "uid": uid,
        "title": title,
        "tags": ["lorafleet"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [datasource_var, *variables]},
        "annotations": {"list": []},
        "panels": rendered,
    }


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON model, for every LoraFleet dashboard."""
    trainers = render(
        "lorafleet-trainers",
        "LoraFleet / Trainers",
        trainer_panels(),
        [
            variable(
                "pool", "Pool", 'label_values(lorafleet_trainer_cache_entries{job="lorafleet-trainer"}, pool)'
            ),
            variable(
                "pod",
                "Pod",
                'label_values(lorafleet_trainer_cache_entries{job="lorafleet-trainer", pool=~"$pool"}, pod)',
            ),
        ],
    )
    operator = render(
        "lorafleet-operator",
        "LoraFleet / Operator",
        operator_panels(),
        [variable("pod", "Operator pod", 'label_values(up{job="lorafleet-operator"}, pod)')],
    )
    gateway_board = render(
        "lorafleet-gateway",
        "LoraFleet / Gateway",
        gateway_panels(),
        [variable("pod", "Gateway pod", 'label_values(up{job="lorafleet-gateway"}, pod)')],
    )
    return {"trainers.json": trainers, "operator.json": operator, "gateway.json": gateway_board}


def markdown() -> str:
    """The panel-by-panel summary of every dashboard, for the README."""
    lines: list[str] = []
    boards = (("Trainers", trainer_panels()), ("Operator", operator_panels()), ("Gateway", gateway_panels()))
    for name, panels in boards:
        lines += [f"**{name}**", "", "| panel | shows |", "|---|---|"]
        lines += [f"| {p.title} | {p.description} |" for p in panels]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail when the committed JSON is stale")
    mode.add_argument("--markdown", action="store_true", help="print the README summary")
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
        return 0
    stale = []
    for name, model in dashboards().items():
        text = json.dumps(model, indent=2) + "\n"
        path = DASHBOARDS_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        # Written aside and renamed, so a reader never sees half a dashboard.
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    if stale:
        print("stale (run python scripts/render_dashboards.py):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
