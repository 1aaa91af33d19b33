"""Dashboards and alerts against a real run: a trainer trains, Prometheus scrapes, panels get data.

A real `lorafleet-trainer serve --base-model builtin:tiny` (the trainer suite's live helper) runs a
few distill steps with a bearer token; the operator side is the operator's own metrics server and
its own trainer client, which initialises and evicts the adapter as the operator does. A real
Prometheus (Debian package) scrapes both every second with the chart's alert rules loaded. Then
every Trainers panel query must return at least one series (and the key ones sensible values), the
alert rules, "GPU memory not released" above all, must evaluate with health "ok", and the Operator
panels must return series for what this run exercises.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from tests.chart import charting
from tests.chart.operator_side import OperatorSide
from tests.trainer.service.live import LiveTrainer, start_trainer

from lorafleet_api import wire
from lorafleet_local.polling import eventually
from lorafleet_local.prometheus import Prometheus, static_jobs

T = TypeVar("T")
TOKEN = "chart-live-token"
NAMESPACE, ADAPTER = "team-a", "alice"
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
SAMPLE = {
    "prompt": "hi",
    "response": "ok",
    "feedback": "shorter, please",
    "response_logprobs": [-0.7, -1.2],
    "prompt_token_ids": [104, 105],
    "response_token_ids": [111, 107],
    "user_prompt": "hi",
    "system_prompt": "",
}
# What the chart's PodMonitor/ServiceMonitor relabelings give the series in a cluster.
TRAINER_LABELS = {"namespace": NAMESPACE, "pool": "tiny", "pod": "tiny-0", "gpu_residency": "offload"}
OPERATOR_LABELS = {"namespace": "lorafleet", "pod": "lorafleet-operator-0"}
# Needs an adapter deletion through the operator's finalizer, which this run does not do;
# test_dashboards.py parse-checks it and the e2e suite exercises deletion.
NOT_EXERCISED = {"Cache evictions on delete by outcome"}


@dataclass
class Run:
    prometheus: Prometheus
    trainer: LiveTrainer
    operator_url: str
    caches: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("chart-live")
    trainer = start_trainer(workdir / "trainer", token=TOKEN)
    operator = OperatorSide(TOKEN)
    prometheus = Prometheus(workdir / "prometheus", [charting.CHART / "alerts" / "lorafleet.rules.yaml"])
    try:
        prometheus.start(
            static_jobs(
                {
                    "lorafleet-trainer": (f"127.0.0.1:{trainer.port}", TRAINER_LABELS),
                    "lorafleet-operator": (f"127.0.0.1:{operator.port}", OPERATOR_LABELS),
                }
            )
        )
        eventually(
            "both targets up",
            lambda: prometheus.targets_up() == {k: True for k in ("lorafleet-trainer", "lorafleet-operator")},
            timeout=60,
        )
        base = trainer.base_url
        assert (
            operator.run(
                operator.client.init(
                    base, NAMESPACE, ADAPTER, wire.InitRequest.model_validate({"lora": LORA, "epoch": 1})
                )
            )
            == 201
        )
        client = trainer.client()
        caches = []
        for step in range(4):
            if step == 3:
                # The operator's eviction on delete: the next step must restore from storage.
                assert operator.run(operator.client.evict(base, NAMESPACE, ADAPTER)) is True
            reply = client.post(f"/v1/adapters/{NAMESPACE}/{ADAPTER}/distill", json={"samples": [SAMPLE]})
            assert reply.status_code == 200, reply.text
            caches.append(reply.json()["cache"])
        eventually(
            "Prometheus to see all four steps",
            lambda: prometheus.finite_values('sum(lorafleet_trainer_steps_total{outcome="ok"})') == [4.0],
            timeout=60,
        )
        # A few more scrapes of the trainer after the last step, so every rate window holds the whole run.
        scrapes = 'count_over_time(up{job="lorafleet-trainer"}[10m])'
        (seen,) = prometheus.finite_values(scrapes)
        eventually(
            "three more scrapes of the trainer",
            lambda: max(prometheus.finite_values(scrapes), default=0.0) >= seen + 3,
            timeout=60,
        )
        yield Run(prometheus, trainer, f"http://127.0.0.1:{operator.port}", caches)
    finally:
        prometheus.stop()
        operator.close()
        trainer.stop()


def panel_queries(dashboard: str) -> list[tuple[str, str]]:
    return [
        (panel["title"], charting.substitute(target["expr"]))
        for panel in charting.dashboard(dashboard)["panels"]
        for target in panel["targets"]
    ]


def test_the_run_missed_hit_hit_then_missed_after_eviction(run: Run) -> None:
    assert run.caches == ["miss", "hit", "hit", "miss"]


def test_every_trainers_panel_query_returns_a_series(run: Run) -> None:
    empty = [
        f"{title}: {expr}" for title, expr in panel_queries("trainers.json") if not run.prometheus.query(expr)
    ]
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_trainers_panels_show_what_the_run_did(run: Run) -> None:
    queries = dict(panel_queries("trainers.json"))
    (ratio,) = run.prometheus.finite_values(queries["Cache hit ratio"])
    assert ratio == pytest.approx(0.5)  # two hits out of four steps
    assert run.prometheus.finite_values(
        'sum(lorafleet_trainer_cache_evictions_total{reason="explicit"})'
    ) == [1.0]
    by_cache = {
        s["metric"]["cache"]
        for s in run.prometheus.query(queries["Step latency p50 / p95 by cache hit and miss"])
        if s["value"][1] not in {"NaN", "+Inf"}
    }
    assert by_cache == {"hit", "miss"}
    storage = run.prometheus.query(queries["Adapter storage read and write"].replace("[1m]", "[5m]"))
    assert all(float(s["value"][1]) > 0 for s in storage), storage
    (capacity,) = run.prometheus.finite_values(
        'lorafleet_trainer_cache_capacity_bytes{pool="tiny", pod="tiny-0"}'
    )
    assert capacity > 0


def test_alert_rules_evaluate_without_error(run: Run) -> None:
    started = time.time()

    def evaluated_since_start() -> bool:
        # lastEvaluation is RFC 3339 with nanoseconds; whole seconds are precise enough here.
        stamps = [rule["lastEvaluation"][:19] for rule in run.prometheus.rules()]
        return all(
            time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S")) - time.timezone > started for s in stamps
        )

    eventually("a rule evaluation after the run", evaluated_since_start, timeout=30)
    rules = {rule["name"]: rule for rule in run.prometheus.rules()}
    assert set(rules) >= {"LoraFleetGPUMemoryNotReleased", "LoraFleetCacheThrashing", "LoraFleetTrainerDown"}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert not rule.get("lastError"), name
    # The inputs of the GPU rule exist for this pod, so "ok" means it ran over real series.
    assert run.prometheus.query('lorafleet_trainer_gpu_memory_allocated_bytes{gpu_residency!="keep"}')
    # On a CPU pod allocated GPU memory stays 0: nothing held after steps, so nothing pending.
    assert rules["LoraFleetGPUMemoryNotReleased"]["state"] == "inactive"


def hook_script() -> str:
    (pod,) = charting.kinds(charting.render(sets=["trainerPool.enabled=true"]), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    return str(command[2])


def run_hook(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", hook_script()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_helm_test_hook_passes_against_live_servers(run: Run) -> None:
    # The hook's own script, run here against the real operator metrics server and trainer.
    env = {
        "OPERATOR_URL": f"{run.operator_url}/healthz",
        "TRAINER_HOST": "127.0.0.1",
        "TRAINER_PORT": str(run.trainer.port),
        "TRAINER_REPLICAS": "1",
        "TIMEOUT_SECONDS": "20",
    }
    done = run_hook(env)
    assert done.returncode == 0, done.stderr
    assert f"ok http://127.0.0.1:{run.trainer.port}/readyz" in done.stdout
    # And it fails, saying what did not answer, when a trainer is missing.
    done = run_hook({**env, "TRAINER_PORT": "1", "TIMEOUT_SECONDS": "2"})
    assert done.returncode == 1
    assert "no 200 from http://127.0.0.1:1/readyz" in done.stderr


def test_operator_panels_return_series_for_what_ran(run: Run) -> None:
    empty = [
        f"{title}: {expr}"
        for title, expr in panel_queries("operator.json")
        if title not in NOT_EXERCISED and not run.prometheus.query(expr)
    ]
    assert not empty, "panels without data:\n" + "\n".join(empty)
    routes = {
        (s["metric"]["route"], s["metric"]["code"])
        for s in run.prometheus.query("lorafleet_operator_trainer_requests_total")
    }
    assert routes == {("init", "201"), ("evict", "200")}
