"""The loop closed on Kubernetes: every version a trainer commits is served by a real vLLM pod.

On the local control plane (or a real cluster), with the chart's operator: the example pool on the
real instruct model, the example vLLM Deployment (vLLM's CPU build serving the same model) and
adapters applied with kubectl. After each answered step on alice (a one-sample rollout of its goal,
with the goal's feedback), vLLM lists alice at that version's artifact and its greedy answer through
the name `alice` equals the trainer's own greedy answer for that version; the latency from the
step's answer to vLLM serving it is kept as a figure (its bound, p95 within 5 s, is
`make bench-publishing`'s: this test checks what is served, on cores it shares with vLLM, not how
fast). Then the faults: an adapter whose rank the server
refuses, the vLLM pod restarted (training goes on meanwhile; every adapter is served again within
30 s of the pod being Ready), and a deleted adapter (vLLM no longer knows it; the trainer's cache
entry is gone).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from tests.serving import gateway_load

from lorafleet_local import goals
from lorafleet_local.fleet import EXAMPLES, POOL, Fleet, pool_manifest
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually
from lorafleet_trainer.engine.holds import PUBLISH, PhaseHolds

# e2e as well: it shares the session's cluster and runs with the other end-to-end tests, last.
pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

NS = "lorafleet-serving"
VLLM_READY = "2400s"  # vLLM's first start on two busy cores took up to 17 minutes here
RESYNC = 3  # the operator's status poll, seconds: statuses follow within a few seconds
STEPS = 4  # steps on alice, each served and compared
WIDE_RANK = 32  # above the example server's --max-lora-rank 16
GATEWAY_PORT = 8090  # the chart's gateway.port
GATEWAY_REPLICAS = 2  # the chart's gateway.replicas
LOAD_CLIENTS = 16
LOAD_SECONDS = 120.0  # the load runs at least this long, faults included
PHASE = 3  # feedbacks accepted that mark each stage of the load: flowing, after each fault


def _http(method: str, url: str, body: Any = None, timeout: float = 120.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Server:
    """The vLLM pod of the example Deployment, as a client reaches it."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def pod(self) -> dict[str, Any]:
        pods = self.kube.get("pods", "-n", NS, "-l", "app=vllm")["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == 1, [p["metadata"]["name"] for p in pods]
        return dict(live[0])

    def url(self) -> str:
        return self.kube.reach(NS, self.pod()["metadata"]["name"], 8000)

    def loaded(self) -> dict[str, str]:
        cards = _http("GET", self.url() + "/v1/models", timeout=10)["data"]
        return {c["id"]: c["root"] for c in cards if c.get("parent")}

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        answer = _http("POST", self.url() + "/v1/chat/completions", body)
        return str(answer["choices"][0]["message"]["content"])


def _adapters_manifest() -> str:
    """alice and bob from the examples, and `wide`, whose rank the example server refuses."""
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "adapters.yaml").read_text()) if d]
    alice, bob = (next(d for d in docs if d["metadata"]["name"] == name) for name in ("alice", "bob"))
    wide = {
        "apiVersion": alice["apiVersion"],
        "kind": "LoraAdapter",
        "metadata": {"name": "wide"},
        "spec": {
            "pool": POOL,
            "lora": {"rank": WIDE_RANK, "alpha": 64, "targetModules": ["q_proj", "v_proj"]},
            "serving": {"name": "wide-r32"},
        },
    }
    return yaml.safe_dump_all([alice, bob, wide])


@pytest.fixture(scope="module")
def loop(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Server]]:
    fleet = Fleet.install(
        kube,
        NS,
        tmp_path_factory.mktemp("serving"),
        f"operator.resyncSeconds={RESYNC}",
    )
    try:
        documents = list(yaml.safe_load_all(pool_manifest("builtin:smollm2")))
        for doc in documents:
            if doc["kind"] == "TrainerPool":
                doc["spec"]["replicas"] = 1  # one trainer beside vLLM on two cores
        kube.apply(yaml.safe_dump_all(documents), namespace=NS)
        started = time.monotonic()
        kube.apply(EXAMPLES / "vllm.yaml", namespace=NS)
        kube.apply(_adapters_manifest(), namespace=NS)
        wait = ("-n", NS, "--timeout=1200s")
        kube.kubectl("wait", f"trainerpool/{POOL}", "--for=condition=Ready", *wait, timeout=1300)
        kube.kubectl("wait", "loraadapter", "--all", "--for=condition=Ready", *wait, timeout=1300)
        kube.kubectl(
            "wait", "deployment/vllm", "-n", NS, "--for=condition=Available", f"--timeout={VLLM_READY}",
            timeout=2500,
        )  # fmt: skip
        fleet.figures["vllm_apply_to_ready_s"] = round(time.monotonic() - started, 1)
        yield fleet, Server(kube)
    finally:
        print(f"\nserving figures: {json.dumps(fleet.figures)}")
        fleet.uninstall()


def _served_condition(fleet: Fleet, name: str) -> dict[str, Any]:
    status = fleet.adapter(name).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Served"), {})


def _wait_served(server: Server, name: str, artifact: str, timeout: float) -> float:
    """Seconds until vLLM lists ``name`` loaded from ``artifact``'s directory."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if server.loaded().get(name, "").endswith("/" + artifact):
                return time.monotonic() - start
        except OSError:
            pass  # the server is restarting
        time.sleep(0.05)
    raise AssertionError(f"vLLM did not serve {name} at {artifact} within {timeout:.0f} s")


def one_sample(fleet: Fleet, url: str) -> dict[str, Any]:
    """A one-sample distill body of alice's goal: a short rollout of its first training question, on
    the adapter at ``url``, with the goal's feedback and training settings."""
    suite = goals.Goal.of("alice").suite
    body = {
        "prompts": [{"messages": suite.messages(suite.train[0])}],
        "max_tokens": 8,
        "feedback": suite.feedback,
    }
    code, answer = fleet.call("POST", url + "/rollouts", body)
    assert code == 200, answer
    return {"samples": [answer["rollouts"][0]["sample"]]}


def test_each_committed_version_is_served_by_vllm_within_seconds(loop: tuple[Fleet, Server]) -> None:
    """Steps on alice (each a fresh one-sample rollout of its goal's first training question, with
    the goal's feedback): after each answered step vLLM serves that version, and its greedy answer
    to a held-out question is the trainer's own at that version. Whether the versions learn the goal
    on held-out questions is the learning test's (tests/trainer/service/test_learning.py, the whole
    goal loop); here what vLLM serves is checked against what the trainer trained."""
    fleet, server = loop
    url = fleet.adapter_url("alice")
    suite = goals.Goal.of("alice").suite
    question = suite.messages(suite.held_out[0].question)
    latencies, step_ms, answers, version = [], [], [], 0
    for _ in range(STEPS):
        code, answer = fleet.call("POST", url + "/distill", one_sample(fleet, url))
        assert code == 200 and answer["version"] == version + 1, answer
        version = answer["version"]
        latencies.append(_wait_served(server, "alice", answer["artifact"], timeout=60))
        step_ms.append(answer["timing_ms"]["total"])
        served = server.chat("alice", question, suite.max_tokens)
        code, own = fleet.call(
            "POST", url + "/generate", {"messages": question, "max_tokens": suite.max_tokens}
        )
        assert code == 200, own
        assert served == own["text"], f"version {version}: vLLM {served!r} != trainer {own['text']!r}"
        answers.append(served)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * len(latencies)) - 1)]
    fleet.figures.update(
        publish_p50_s=round(statistics.median(latencies), 3),
        publish_p95_s=round(p95, 3),
        publish_max_s=round(latencies[-1], 3),
        step_with_publishing_ms=round(statistics.mean(step_ms), 1),
    )
    print(f"\nalice's answers from vLLM, version by version: {answers}\npublish latencies: {latencies}")

    def served_everywhere() -> dict[str, Any]:
        condition = _served_condition(fleet, "alice")
        assert condition.get("status") == "True", condition
        status = fleet.adapter("alice")["status"]
        assert [s["version"] for s in status["served"]] == [version], status["served"]
        assert status["servedName"] == "alice"
        return condition

    eventually("alice served at its last version on every server", served_everywhere, timeout=60, interval=1)


def test_steps_answer_without_serving_and_publishing_resumes_when_it_returns(
    loop: tuple[Fleet, Server],
) -> None:
    """Back-to-back steps with vLLM loading each version meanwhile, then with the pool's serving
    removed (the trainer publishes nowhere, the same vLLM process idles), then with it back (the
    latest version is served again). The step times of both are figures for the note; what
    publishing costs a step is measured, and bounded, by `make bench-publishing`, on a core of its
    own for each side rather than on the two cores this test shares with vLLM."""
    fleet, server = loop
    url = fleet.adapter_url("alice")
    body = one_sample(fleet, url)

    def steps(n: int) -> list[float]:
        totals = []
        for _ in range(n):
            code, answer = fleet.call("POST", url + "/distill", body)
            assert code == 200, answer
            totals.append(float(answer["timing_ms"]["total"]))
        return totals

    def servers() -> list[str]:
        code, state = fleet.call("GET", fleet.adapter("alice")["status"]["endpoint"] + "/v1/serving")
        assert code == 200, state
        return list(state["servers"])

    with_publishing = steps(4)
    serving = fleet.kube.get("trainerpool", POOL, "-n", NS)["spec"]["serving"]
    fleet.kube.kubectl(
        "patch",
        "trainerpool",
        POOL,
        "-n",
        NS,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/serving"}]),
    )
    eventually("the trainer to publish nowhere", lambda: servers() == [], timeout=60, interval=0.5)
    without = steps(4)
    fleet.kube.kubectl(
        "patch",
        "trainerpool",
        POOL,
        "-n",
        NS,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"serving": serving}}),
    )
    eventually("the trainer to publish again", lambda: servers() != [], timeout=60, interval=0.5)
    _, state = fleet.call("GET", url)
    _wait_served(server, "alice", state["artifact"], timeout=30)
    fleet.figures.update(
        step_ms_with_publishing=round(statistics.mean(with_publishing), 1),
        step_ms_without_publishing=round(statistics.mean(without), 1),
    )
    print(f"\nstep ms with publishing {with_publishing}, without {without}")


def test_a_server_refusing_a_load_shows_in_status_and_training_goes_on(loop: tuple[Fleet, Server]) -> None:
    fleet, _ = loop

    def refused() -> dict[str, Any]:
        condition = _served_condition(fleet, "wide")
        assert condition.get("reason") == "PublishFailed", condition
        return condition

    condition = eventually("wide refused by vLLM", refused, timeout=120, interval=1)
    assert "rank" in condition["message"].lower(), condition["message"]
    events = fleet.kube.get("events", "-n", NS, "--field-selector", "involvedObject.name=wide")["items"]
    assert any(e["reason"] == "PublishFailed" and e["type"] == "Warning" for e in events), events
    wide = fleet.adapter_url("wide")
    code, answer = fleet.call("POST", wide + "/distill", one_sample(fleet, wide))
    assert code == 200, answer


def _gateways(kube: Kube) -> list[str]:
    """The chart's gateway replicas, each reached at its own pod address."""
    pods = kube.get("pods", "-n", NS, "-l", "app.kubernetes.io/component=gateway")["items"]
    live = [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == GATEWAY_REPLICAS, live
    return [kube.reach(NS, name, GATEWAY_PORT) for name in sorted(live)]


def _pod_ready(kube: Kube, name: str) -> dict[str, Any] | None:
    pods = kube.get("pods", "-n", NS, "--field-selector", f"metadata.name={name}")["items"]
    if not pods:
        return None
    ready = [c for c in pods[0]["status"].get("conditions") or [] if c["type"] == "Ready"]
    return dict(pods[0]) if ready and ready[0]["status"] == "True" else None


def test_load_through_two_gateways_survives_a_trainer_and_a_vllm_pod_deleted(
    loop: tuple[Fleet, Server],
) -> None:
    """16 clients chat with alice and bob and send CLaaS feedback on the answers, through both
    gateway replicas, for at least two minutes. Once feedback flows the trainer pod is deleted;
    once feedback flows on its replacement the vLLM process is killed (the adapters are shown
    unserved; training goes on) and its pod deleted. Every accepted feedback is applied exactly once
    (the accepted versions are exactly the trainer's new versions), no chat said to come from the
    latest version is older than one its client was told of, and the only refusals are 429s and
    503s with Retry-After. After the load the new vLLM pod serves every adapter again within 30 s
    of being Ready, and a chat through each replica is the latest version's own greedy answer."""
    fleet, server = loop
    kube = fleet.kube
    if kube.runner is None:
        pytest.skip("takes the vLLM process down through the local pod runner")
    names = ("alice", "bob")
    workloads = []
    for name in names:
        suite = goals.Goal.of(name).suite
        workloads.append(gateway_load.Workload(f"{NS}/{name}", list(suite.train), suite.feedback))
    before = {name: fleet.call("GET", fleet.adapter_url(name))[1]["version"] for name in names}
    run = gateway_load.LoadRun(_gateways(kube), workloads, clients=LOAD_CLIENTS)
    run.start()
    try:
        eventually("feedback accepted under load", lambda: run.feedbacks() >= PHASE, timeout=900, interval=1)
        trainer = fleet.adapter("alice")["status"]["pod"]
        uid = kube.get("pod", trainer, "-n", NS)["metadata"]["uid"]
        kube.kubectl("delete", "pod", trainer, "-n", NS, "--wait=false")

        def replaced() -> bool:
            pod = _pod_ready(kube, fleet.adapter("alice")["status"]["pod"])
            return pod is not None and pod["metadata"]["uid"] != uid

        eventually("a new trainer pod, Ready", replaced, timeout=900, interval=1)
        mark = run.feedbacks()
        eventually(
            "feedback accepted by the new trainer", lambda: run.feedbacks() >= mark + PHASE, timeout=900
        )

        vllm = server.pod()["metadata"]["name"]
        kube.runner.kill(NS, vllm, restart=False)  # down until its pod is deleted below
        eventually(
            "alice shown unserved while vLLM is down", lambda: _unserved(fleet), timeout=120, interval=1
        )
        mark = run.feedbacks()  # training goes on while no server serves
        eventually(
            "feedback accepted while vLLM is down", lambda: run.feedbacks() >= mark + PHASE, timeout=900
        )
        kube.kubectl("delete", "pod", vllm, "-n", NS, "--wait=false")
        run.stop.wait(max(0.0, LOAD_SECONDS - (time.monotonic() - run.started)))  # the load's length
    finally:
        run.finish()
        summary = run.summary()
        fleet.figures["gateway_load"] = summary
        print(f"\ngateway load: {json.dumps(summary)}")

    def new_vllm() -> dict[str, Any]:
        pod = server.pod()
        assert pod["metadata"]["name"] != vllm, "the old pod is still there"
        assert _pod_ready(kube, pod["metadata"]["name"]) is not None, pod["status"]
        return pod

    eventually("a new vLLM pod to be Ready", new_vllm, timeout=2400, interval=1)
    ready_at = time.monotonic()  # within a second of the pod turning Ready (the wait polls)
    after = {}
    for name in names:
        code, state = fleet.call("GET", fleet.adapter_url(name))
        assert code == 200, state
        after[name] = state["version"]
        _wait_served(server, name, state["artifact"], timeout=30)
    assert server.loaded().get("wide-r32") is None  # still refused: its rank is too high
    fleet.figures["new_vllm_ready_to_served_s"] = round(time.monotonic() - ready_at, 2)

    assert not run.errors, run.errors[:20]
    assert not run.unaccepted, f"feedback never accepted: {run.unaccepted}"
    assert not run.stale, run.stale[:20]
    for name, workload in zip(names, workloads, strict=True):
        versions = sorted(run.accepted[workload.adapter].values())
        assert versions == list(range(before[name] + 1, after[name] + 1)), (name, before[name], versions)
    assert run.chats > 0 and run.wall_s >= LOAD_SECONDS, summary

    # Every replica answers with the latest version, and the answer is that version's own.
    suite = goals.Goal.of("alice").suite
    question = [{"role": "user", "content": suite.held_out[0].question}]
    code, own = fleet.call(
        "POST", fleet.adapter_url("alice") + "/generate", {"messages": question, "max_tokens": 8}
    )
    assert code == 200, own
    chat = {"model": f"{NS}/alice", "messages": question, "max_tokens": 8, "temperature": 0.0}
    for gateway in _gateways(kube):
        r = httpx.post(gateway + "/v1/chat/completions", json=chat, timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers[gateway_load.VERSION_HEADER] == str(after["alice"]), dict(r.headers)
        assert r.headers[gateway_load.LATEST_HEADER] == "true", dict(r.headers)
        assert r.json()["choices"][0]["message"]["content"] == own["text"]

    eventually(
        "alice shown served again",
        lambda: _served_condition(fleet, "alice").get("status") == "True",
        timeout=60,
    )
    events = kube.get("events", "-n", NS, "--field-selector", "involvedObject.name=alice")["items"]
    reasons = {e["reason"] for e in events}
    assert "Served" in reasons and reasons & {"NoServers", "PublishFailed"}, reasons


def _unserved(fleet: Fleet) -> dict[str, Any] | None:
    condition = _served_condition(fleet, "alice")
    if condition.get("status") == "False" and condition.get("reason") in ("NoServers", "PublishFailed"):
        print(f"\nwhile vLLM is down: {condition['reason']}: {condition['message']}")
        return condition
    return None


def test_a_trainer_killed_mid_publish_publishes_its_latest_version_once_back(
    loop: tuple[Fleet, Server],
) -> None:
    fleet, server = loop
    kube = fleet.kube
    if kube.runner is None:
        pytest.skip("parks and kills the trainer through the local pod runner")
    pod = fleet.adapter("alice")["status"]["pod"]
    worker = kube.runner.worker(NS, pod)
    assert worker is not None
    holds = PhaseHolds(worker.hold_dir)
    url = fleet.adapter_url("alice")
    holds.arm(PUBLISH)
    try:
        code, answer = fleet.call("POST", url + "/distill", one_sample(fleet, url))
        assert code == 200, answer  # the step answers; its version waits to be published
        eventually("the publisher to park before its load", lambda: holds.held(PUBLISH), timeout=60)
        assert not server.loaded().get("alice", "").endswith("/" + answer["artifact"])
        kube.runner.kill(NS, pod, restart=True)
    finally:
        holds.release(PUBLISH)
    kube.kubectl("wait", f"pod/{pod}", "-n", NS, "--for=condition=Ready", "--timeout=600s", timeout=660)
    # The restarted trainer is told its servers and adapters again, and publishes the stored version.
    _wait_served(server, "alice", answer["artifact"], timeout=120)
    url = fleet.adapter_url("alice")
    code, after = fleet.call("POST", url + "/distill", one_sample(fleet, url))
    assert code == 200 and after["version"] == answer["version"] + 1, after
    _wait_served(server, "alice", after["artifact"], timeout=30)


def test_deleting_an_adapter_unloads_it_from_vllm_and_evicts_it(loop: tuple[Fleet, Server]) -> None:
    fleet, server = loop
    assert "alice" in server.loaded()
    endpoint = fleet.adapter("alice")["status"]["endpoint"]
    fleet.kube.kubectl("delete", "loraadapter", "alice", "-n", NS, "--timeout=120s", timeout=150)
    assert "alice" not in server.loaded()
    code, cache = fleet.call("GET", endpoint + "/v1/cache")
    assert code == 200, cache
    assert f"{NS}/alice" not in [e["adapter"] for e in cache["entries"]]
