"""LoraFleet end to end, the way a user runs it: Helm, `kubectl apply`, feedback over HTTP, Prometheus.

The tests run in file order on one release: install, reject bad input, become Ready, train, evict,
survive a pod loss (the example pool keeps adapters on a claim: nothing is lost), uninstall. Each
test asserts what a user would check; the operator runs from the chart with the chart's own
ServiceAccount and RBAC, never as the admin.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lorafleet_local.fleet import EXAMPLES, POOL, RELEASE, Fleet, feedback_for, pool_manifest
from lorafleet_local.kube import CommandError, Kube
from lorafleet_local.polling import eventually

pytestmark = pytest.mark.e2e

NS = "lorafleet-e2e"
ADAPTERS = ("alice", "bob", "carol")
READY_TIMEOUT = "600s"  # the first trainer start generates builtin:tiny on a busy 2-core machine
WAIT_SECONDS = 660  # kubectl wait's own bound above, and a margin for kubectl itself


@pytest.fixture(scope="module")
def scenario(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet.install(kube, NS, tmp_path_factory.mktemp("fleet"))
    try:
        yield fleet
    finally:
        print(f"\nscenario figures: {json.dumps(fleet.figures)}")
        # Leave nothing behind for later tests even when a step above failed.
        fleet.uninstall()


def test_the_operator_runs_under_the_charts_service_account(scenario: Fleet) -> None:
    kube = scenario.kube
    pod = scenario.operator()
    account = pod["spec"]["serviceAccountName"]
    assert account not in ("", "default")
    subject = f"system:serviceaccount:{NS}:{account}"
    can = kube.kubectl(
        "auth", "can-i", "list", "loraadapters.lorafleet.io", "-n", NS, "--as", subject, check=False
    )
    assert can.stdout.strip() == "yes"
    cannot = kube.kubectl("auth", "can-i", "create", "clusterroles", "--as", subject, check=False)
    assert cannot.stdout.strip() == "no"
    assert len(scenario.token) >= 16


@pytest.mark.parametrize("manifest", sorted((EXAMPLES / "invalid").glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_manifests_are_rejected_by_the_api_server(scenario: Fleet, manifest: Path) -> None:
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


def test_the_example_pool_and_adapters_become_ready(scenario: Fleet) -> None:
    kube = scenario.kube
    start = time.monotonic()
    kube.apply(pool_manifest("builtin:tiny"), namespace=NS)
    kube.apply(EXAMPLES / "adapters.yaml", namespace=NS)
    kube.kubectl(
        "wait",
        f"trainerpool/{POOL}",
        "-n",
        NS,
        "--for=condition=Ready",
        f"--timeout={READY_TIMEOUT}",
        timeout=WAIT_SECONDS,
    )
    kube.kubectl(
        "wait",
        "loraadapter",
        "--all",
        "-n",
        NS,
        "--for=condition=Ready",
        f"--timeout={READY_TIMEOUT}",
        timeout=WAIT_SECONDS,
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


def test_kubectl_get_shows_the_printer_columns(scenario: Fleet) -> None:
    out = scenario.kube.kubectl("get", "loraadapters", "-n", NS).stdout.splitlines()
    assert out[0].split() == ["NAME", "POOL", "POD", "PHASE", "VERSION", "CACHED", "SERVED", "AGE"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == set(ADAPTERS)
    assert all(row[1] == POOL and row[3] == "Ready" for row in rows.values())


def test_changing_spec_lora_is_refused_by_the_cel_rule(scenario: Fleet) -> None:
    before = scenario.adapter("alice")["spec"]["lora"]
    patch = json.dumps({"spec": {"lora": {"rank": before["rank"] * 2}}})
    with pytest.raises(CommandError) as refused:
        scenario.kube.kubectl("patch", "loraadapter", "alice", "-n", NS, "--type=merge", "-p", patch)
    assert "spec.lora is immutable" in refused.value.stderr
    assert scenario.adapter("alice")["spec"]["lora"] == before


def test_feedback_trains_each_adapter_from_the_cache_without_storage_reads(scenario: Fleet) -> None:
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
    ratio = scenario.hit_ratio()
    assert ratio is not None and ratio > 0
    scenario.figures["cache_hit_ratio"] = round(ratio, 3)
    for name in ADAPTERS:
        eventually(
            f"{name}'s status.version to reach {versions[name]}",
            lambda n=name: scenario.adapter(n)["status"].get("version") == versions[n],  # type: ignore[misc]
            timeout=90,
        )


def test_the_status_follows_each_commit(scenario: Fleet) -> None:
    """The operator follows its trainers' changes: each step's version reaches status.version
    without waiting for the resync. The lag from the step's answer to a `kubectl get` that shows
    it is printed (p50, p95 over 20 steps; read by polling kubectl, so it includes its start-up),
    not asserted: it is a figure of this machine."""
    url = scenario.adapter_url("bob")
    lags = []
    for _ in range(20):
        code, step = scenario.call("POST", url + "/distill", feedback_for("bob"))
        answered = time.monotonic()
        assert code == 200, step
        eventually(
            f"bob's status.version to reach {step['version']}",
            lambda v=step["version"]: scenario.adapter("bob")["status"].get("version") == v,  # type: ignore[misc]
            timeout=90,
            interval=0.05,
        )
        lags.append(time.monotonic() - answered)
    lags.sort()
    scenario.figures["status_lag_p50_s"] = round(lags[len(lags) // 2], 2)
    scenario.figures["status_lag_p95_s"] = round(lags[int(0.95 * len(lags)) - 1], 2)


def test_feedback_through_the_gateway_steps_the_adapter_where_it_lives(scenario: Fleet) -> None:
    """The chart's gateway finds alice through the API (its read-only RBAC), scores the text-only
    feedback on alice's trainer and steps it there; /v1/models lists the release's adapters."""
    kube = scenario.kube
    pods = kube.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=gateway")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]  # the chart's two replicas
    gateway = kube.reach(NS, pods[0]["metadata"]["name"], 8090)
    models = json.loads(urllib.request.urlopen(f"{gateway}/v1/models", timeout=60).read())
    assert {c["adapter"] for c in models["data"]} >= {f"{NS}/{name}" for name in ADAPTERS}
    code, before = scenario.call("GET", scenario.adapter_url("alice"))
    assert code == 200, before
    body = {
        "lora_id": f"{NS}/alice",
        "prompt": "What is the capital of France?",
        "response": "Paris.",
        "feedback": "Answer in one word.",
    }
    request = urllib.request.Request(
        f"{gateway}/v1/feedback", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
    assert answer["version"] == before["version"] + 1, answer
    assert answer["results"][0]["samples"] == [f"scored:{before['version']}"]
    code, after = scenario.call("GET", scenario.adapter_url("alice"))
    assert code == 200 and after["version"] == answer["version"], after


def test_deleting_an_adapter_evicts_its_cache_entry(scenario: Fleet) -> None:
    pod = scenario.adapter("bob")["status"]["pod"]
    others = {f"{NS}/{n}" for n in ADAPTERS if n != "bob" and scenario.adapter(n)["status"]["pod"] == pod}
    assert f"{NS}/bob" in scenario.cached(pod)
    start = time.monotonic()
    scenario.kube.kubectl("delete", "loraadapter", "bob", "-n", NS, "--wait=false")
    eventually(
        "bob's cache entry to leave its pod", lambda: f"{NS}/bob" not in scenario.cached(pod), timeout=60
    )
    scenario.figures["delete_to_evicted_s"] = round(time.monotonic() - start, 2)
    eventually(
        "the bob object to go", lambda: not scenario.kube.exists("loraadapter", "bob", "-n", NS), timeout=60
    )
    # Only bob's entry went: the other adapters on that pod stay warm.
    assert others <= scenario.cached(pod)


def test_deleting_a_pod_places_its_adapters_again(scenario: Fleet) -> None:
    before = scenario.adapter("alice")["status"]
    code, trained = scenario.call("GET", scenario.adapter_url("alice", before))
    assert code == 200 and trained["version"] > 0, trained
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
        timeout=WAIT_SECONDS,
    )
    scenario.refresh_targets()
    # The default pool keeps adapters on its claim: the new pod found alice's weights, nothing was lost.
    status = scenario.adapter("alice")["status"]
    weights = {c["type"]: c for c in status["conditions"]}["WeightsStored"]
    assert (weights["status"], weights["reason"]) == ("True", "Found"), weights
    assert "lostVersion" not in status, status
    code, state = scenario.call("GET", scenario.adapter_url("alice", status))
    assert code == 200 and state["version"] == trained["version"], state
    code, step = scenario.call("POST", scenario.adapter_url("alice") + "/distill", feedback_for("alice"))
    assert code == 200, step
    assert step["version"] == trained["version"] + 1, step


# Where a refusal shows in the operator's log: httpx's response line, an ApiError ("403: GET ..."),
# and the API server's message ("... is forbidden: ..."). A bare 403 is not enough: log timestamps
# carry milliseconds (",403 INFO").
DENIED = re.compile(r'"HTTP/[\d.]+ 403\b|(?<![\d,.:])\b403: |forbidden', re.IGNORECASE)


def test_the_denial_pattern_tells_refusals_from_timestamps() -> None:
    url = "https://127.0.0.1:33155/apis/lorafleet.io/v1alpha1/namespaces/lorafleet-e2e/loraadapters/carol"
    allowed = f'2026-11-27 05:10:29,403 INFO httpx: HTTP Request: GET {url}/status "HTTP/1.1 200 OK"'
    refused = [
        f'2026-11-27 05:10:29,118 INFO httpx: HTTP Request: PATCH {url}/status "HTTP/1.1 403 Forbidden"',
        f"2026-11-27 05:10:29,403 ERROR kopf: 403: PATCH {url}: loraadapters.lorafleet.io is not allowed",
        '2026-11-27 05:10:29,403 ERROR kopf: pods is Forbidden: User "system:serviceaccount:x" cannot list',
    ]
    assert not DENIED.search(allowed)
    assert all(DENIED.search(line) for line in refused)


def test_the_operator_never_got_a_403(scenario: Fleet) -> None:
    log = scenario.kube.pod_log(NS, scenario.operator_pod)
    assert log.strip(), "the operator wrote no log at all"
    denied = [line for line in log.splitlines() if DENIED.search(line)]
    assert not denied, denied[:5]
    url = scenario.kube.reach(NS, scenario.operator_pod, scenario.metrics_port) + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    value = {s.name: s.value for s in samples if not s.labels}
    # It did its work under the chart's RBAC: it leads, it placed every adapter (and alice again).
    assert value["lorafleet_operator_leader"] == 1
    assert value["lorafleet_operator_placements_total"] >= len(ADAPTERS) + 1
    assert not [s for s in samples if s.labels.get("code") == "403"]


def test_uninstall_leaves_nothing_behind(scenario: Fleet) -> None:
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
