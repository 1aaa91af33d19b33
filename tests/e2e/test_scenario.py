"""LoraFleet end to end, the way a user runs it: Helm, `kubectl apply`, feedback over HTTP, Prometheus.

The tests run in file order on one release: install, reject bad input, become Ready, train, evict,
survive a pod loss, uninstall. Each test asserts what a user would check; the operator runs
from the chart with the chart's own ServiceAccount and RBAC, never as the admin.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.e2e import processes
from tests.e2e.kube import CommandError, Kube, eventually
from tests.e2e.prometheus import Prometheus

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lorafleet"
EXAMPLES = REPO / "examples"
NS = "lorafleet-e2e"
RELEASE = "lorafleet"
POOL = "demo"
ADAPTERS = ("alice", "bob", "carol")
TRAINER_PORT = 8080
READY_TIMEOUT = "600s"  # the first trainer start generates builtin:tiny on a busy 2-core machine


@dataclass
class Scenario:
    kube: Kube
    prometheus: Prometheus
    metrics_port: int
    token: str = ""
    operator_pod: str = ""
    figures: dict[str, float] = field(default_factory=dict)

    def adapter(self, name: str) -> dict[str, Any]:
        return dict(self.kube.get("loraadapter", name, "-n", NS))

    def trainer_url(self, pod: str) -> str:
        return self.kube.reach(NS, pod, TRAINER_PORT)

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def adapter_url(self, name: str) -> str:
        """The adapter's trainer route, from its status.endpoint, reachable from this process."""
        status = self.adapter(name)["status"]
        endpoint = urllib.parse.urlsplit(status["endpoint"])
        base = self.trainer_url(status["pod"])
        if self.kube.local:
            # Locally the test reaches the very address the operator published.
            assert base == f"{endpoint.scheme}://{endpoint.netloc}", (base, status["endpoint"])
        path = endpoint.path.rstrip("/")
        route = f"/v1/adapters/{NS}/{name}"
        return base + (path if path.endswith(route) else path + route)

    def refresh_targets(self) -> None:
        pods = self.kube.get("pods", "-n", NS, "-l", f"lorafleet.io/pool={POOL}")["items"]
        targets = {}
        for pod in pods:
            if pod["status"].get("podIP") and not pod["metadata"].get("deletionTimestamp"):
                address = urllib.parse.urlsplit(self.trainer_url(pod["metadata"]["name"])).netloc
                targets[address] = {"namespace": NS, "pod": pod["metadata"]["name"]}
        self.prometheus.set_targets(targets)

    def scraped(self, promql: str, since: float) -> float:
        """A PromQL value from scrapes that all happened after `since` (unix time)."""
        fresh = f'min(timestamp(up{{job="lorafleet-trainers"}})) > {since}'
        eventually(
            f"a scrape of every trainer after {since:.0f}", lambda: self.prometheus.query(fresh), timeout=60
        )
        value = self.prometheus.value(promql)
        return 0.0 if value is None else value


def feedback_for(name: str) -> dict[str, Any]:
    path = EXAMPLES / "feedback" / f"{name}-1.json"
    if not path.exists():
        path = EXAMPLES / "feedback" / "alice-1.json"
    return dict(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def scenario(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    # Locally every pod shares the host's ports, so the operator gets free ones; kind keeps defaults.
    metrics_port = processes.free_port() if kube.local else 8000
    kube.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        f"operator.metricsPort={metrics_port}",
        "--wait",
        "--timeout",
        "5m",
        timeout=400,
    )
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus")).start()
    state = Scenario(kube, prometheus, metrics_port)
    try:
        yield state
    finally:
        prometheus.stop()
        print(f"\nscenario figures: {json.dumps(state.figures)}")
        # Leave nothing behind for later tests even when a step above failed.
        kube.kubectl("delete", "loraadapters,trainerpools", "--all", "-n", NS, "--timeout=120s", check=False)
        kube.helm("uninstall", RELEASE, "--namespace", NS, "--wait", check=False)


def test_the_operator_runs_under_the_charts_service_account(scenario: Scenario) -> None:
    kube = scenario.kube
    pods = kube.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    scenario.operator_pod = pod["metadata"]["name"]
    account = pod["spec"]["serviceAccountName"]
    assert account not in ("", "default")
    subject = f"system:serviceaccount:{NS}:{account}"
    can = kube.kubectl(
        "auth", "can-i", "list", "loraadapters.lorafleet.io", "-n", NS, "--as", subject, check=False
    )
    assert can.stdout.strip() == "yes"
    cannot = kube.kubectl("auth", "can-i", "create", "clusterroles", "--as", subject, check=False)
    assert cannot.stdout.strip() == "no"
    # The trainers' bearer token, as the chart generated it: the Secret behind the operator's token file.
    container = pod["spec"]["containers"][0]
    token_file = next(
        e["value"] for e in container["env"] if e["name"] == "LORAFLEET_OPERATOR_AUTH_TOKEN_FILE"
    )
    mount = next(
        m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"].rstrip("/") + "/")
    )
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    secret = kube.get("secret", volume["secret"]["secretName"], "-n", NS)
    key = token_file.rsplit("/", 1)[1]
    scenario.token = base64.b64decode(secret["data"][key]).decode()
    assert len(scenario.token) >= 16


@pytest.mark.parametrize("manifest", sorted((EXAMPLES / "invalid").glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_manifests_are_rejected_by_the_api_server(scenario: Scenario, manifest: Path) -> None:
    text = manifest.read_text()
    found = re.search(r"#\s*Rejected:\s*(\S+)", text)
    assert found, f"{manifest.name} must say which field it breaks in a '# Rejected: <field> ...' comment"
    field_path = found.group(1)
    obj = yaml.safe_load(text)
    with pytest.raises(CommandError) as rejected:
        scenario.kube.apply(manifest, namespace=NS)
    assert "is invalid" in rejected.value.stderr, rejected.value.stderr
    assert field_path in rejected.value.stderr, rejected.value.stderr
    assert not scenario.kube.exists(obj["kind"].lower(), obj["metadata"]["name"], "-n", NS)


def test_the_example_pool_and_adapters_become_ready(scenario: Scenario) -> None:
    kube = scenario.kube
    start = time.monotonic()
    kube.apply(EXAMPLES / "pool.yaml", namespace=NS)
    kube.apply(EXAMPLES / "adapters.yaml", namespace=NS)
    kube.kubectl(
        "wait", f"trainerpool/{POOL}", "-n", NS, "--for=condition=Ready", f"--timeout={READY_TIMEOUT}"
    )
    kube.kubectl(
        "wait", "loraadapter", "--all", "-n", NS, "--for=condition=Ready", f"--timeout={READY_TIMEOUT}"
    )
    scenario.figures["examples_apply_to_ready_s"] = round(time.monotonic() - start, 1)
    pods = {
        p["metadata"]["name"] for p in kube.get("pods", "-n", NS, "-l", f"lorafleet.io/pool={POOL}")["items"]
    }
    assert pods == {f"{POOL}-0", f"{POOL}-1"}
    for name in ADAPTERS:
        status = scenario.adapter(name)["status"]
        assert status["phase"] == "Ready"
        assert status["pod"] in pods
        assert status["epoch"] >= 1
        assert status["endpoint"].startswith("http")
    scenario.refresh_targets()


def test_kubectl_get_shows_the_printer_columns(scenario: Scenario) -> None:
    out = scenario.kube.kubectl("get", "loraadapters", "-n", NS).stdout.splitlines()
    assert out[0].split() == ["NAME", "POOL", "POD", "PHASE", "VERSION", "CACHED", "AGE"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == set(ADAPTERS)
    assert all(row[1] == POOL and row[3] == "Ready" for row in rows.values())


def test_changing_spec_lora_is_refused_by_the_cel_rule(scenario: Scenario) -> None:
    before = scenario.adapter("alice")["spec"]["lora"]
    patch = json.dumps({"spec": {"lora": {"rank": before["rank"] * 2}}})
    with pytest.raises(CommandError) as refused:
        scenario.kube.kubectl("patch", "loraadapter", "alice", "-n", NS, "--type=merge", "-p", patch)
    assert "spec.lora is immutable" in refused.value.stderr
    assert scenario.adapter("alice")["spec"]["lora"] == before


def test_feedback_trains_each_adapter_from_the_cache_without_storage_reads(scenario: Scenario) -> None:
    versions = {}
    for name in ADAPTERS:
        url = scenario.adapter_url(name)
        code, state = scenario.call("GET", url)
        assert code == 200, state
        code, first = scenario.call("POST", url + "/distill", feedback_for(name))
        assert code == 200, first
        assert first["version"] == state["version"] + 1
        versions[name] = first["version"]
    # Every adapter has been stepped once: its state is in its pod's cache from here on.
    warm_start = time.time()
    reads_before = scenario.scraped("sum(lorafleet_trainer_storage_read_bytes_total)", warm_start)
    hits_before = scenario.scraped("sum(lorafleet_trainer_cache_hits_total)", warm_start)
    for _ in range(2):
        for name in ADAPTERS:
            code, step = scenario.call("POST", scenario.adapter_url(name) + "/distill", feedback_for(name))
            assert code == 200, step
            assert step["cache"] == "hit", (name, step)
            assert step["version"] == versions[name] + 1
            versions[name] = step["version"]
            assert set(step["metrics"]) >= {"total_loss", "distill_loss", "grad_norm", "tokens_processed"}
    warm_end = time.time()
    reads_after = scenario.scraped("sum(lorafleet_trainer_storage_read_bytes_total)", warm_end)
    hits_after = scenario.scraped("sum(lorafleet_trainer_cache_hits_total)", warm_end)
    assert reads_after == reads_before, "warm steps read adapter storage"
    assert hits_after - hits_before == 2 * len(ADAPTERS)
    ratio = scenario.prometheus.value(
        "sum(lorafleet_trainer_cache_hits_total) / "
        "(sum(lorafleet_trainer_cache_hits_total) + sum(lorafleet_trainer_cache_misses_total))"
    )
    assert ratio is not None and ratio > 0
    scenario.figures["cache_hit_ratio"] = round(ratio, 3)
    for name in ADAPTERS:
        eventually(
            f"{name}'s status.version to reach {versions[name]}",
            lambda n=name: scenario.adapter(n)["status"].get("version") == versions[n],  # type: ignore[misc]
            timeout=90,
        )


def test_deleting_an_adapter_evicts_its_cache_entry(scenario: Scenario) -> None:
    status = scenario.adapter("bob")["status"]
    cache_url = scenario.trainer_url(status["pod"]) + "/v1/cache"

    def cached_names() -> set[str]:
        code, cache = scenario.call("GET", cache_url)
        assert code == 200, cache
        return {entry["adapter"] for entry in cache["entries"]}

    assert any("bob" in entry for entry in cached_names())
    start = time.monotonic()
    scenario.kube.kubectl("delete", "loraadapter", "bob", "-n", NS, "--wait=false")
    eventually(
        "bob's cache entry to leave its pod", lambda: not any("bob" in e for e in cached_names()), timeout=60
    )
    scenario.figures["delete_to_evicted_s"] = round(time.monotonic() - start, 2)
    eventually(
        "the bob object to go", lambda: not scenario.kube.exists("loraadapter", "bob", "-n", NS), timeout=60
    )
    assert (
        any("alice" in e or "carol" in e for e in cached_names())
        or status["pod"] != scenario.adapter("alice")["status"]["pod"]
    )


def test_deleting_a_pod_places_its_adapters_again(scenario: Scenario) -> None:
    before = scenario.adapter("alice")["status"]
    scenario.kube.kubectl("delete", "pod", before["pod"], "-n", NS)

    def replaced() -> bool:
        status = scenario.adapter("alice")["status"]
        return status.get("phase") == "Ready" and status["epoch"] > before["epoch"]

    eventually("alice to be placed again with a higher epoch", replaced, timeout=600)
    scenario.kube.kubectl(
        "wait",
        f"trainerpool/{POOL}",
        "-n",
        NS,
        "--for=jsonpath={.status.readyReplicas}=2",
        f"--timeout={READY_TIMEOUT}",
    )
    scenario.refresh_targets()
    code, step = scenario.call("POST", scenario.adapter_url("alice") + "/distill", feedback_for("alice"))
    assert code == 200, step


def test_the_operator_never_got_a_403(scenario: Scenario) -> None:
    log = scenario.kube.pod_log(NS, scenario.operator_pod)
    assert log.strip(), "the operator wrote no log at all"
    assert not re.search(r"\b403\b|[Ff]orbidden", log), [line for line in log.splitlines() if "403" in line][
        :5
    ]
    url = scenario.kube.reach(NS, scenario.operator_pod, scenario.metrics_port) + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        metrics = resp.read().decode()
    assert "lorafleet_operator_placements_total" in metrics
    assert 'code="403"' not in metrics


def test_uninstall_leaves_nothing_behind(scenario: Scenario) -> None:
    kube = scenario.kube
    kube.kubectl("delete", "loraadapters", "--all", "-n", NS, "--timeout=120s")
    kube.kubectl("delete", "trainerpool", POOL, "-n", NS, "--timeout=120s")
    eventually(
        "the pool's pods to be collected",
        lambda: not kube.get("pods", "-n", NS, "-l", "lorafleet.io/pool")["items"],
    )
    kube.helm("uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "2m")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    kinds = "deployments,replicasets,pods,services,configmaps,secrets,serviceaccounts,roles,rolebindings"

    def left_behind() -> list[str]:
        # Objects the chart marks helm.sh/resource-policy=keep (the trainers' token) stay by design.
        items = kube.get(kinds, "-n", NS, "-l", selector)["items"]
        kept = [
            i
            for i in items
            if (i["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"
        ]
        return [f"{i['kind']}/{i['metadata']['name']}" for i in items if i not in kept]

    eventually("the release's namespaced objects to go", lambda: not left_behind())
    assert not kube.get("clusterroles,clusterrolebindings", "-l", selector)["items"]
    assert not kube.get("pods,services", "-n", NS)["items"]
    if kube.runner is not None:
        eventually(
            "every local pod process to stop", lambda: not kube.runner or not kube.runner.workers, timeout=60
        )
