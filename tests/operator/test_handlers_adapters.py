"""LoraAdapter handlers against kmock with real trainer-shaped HTTP servers: placement, re-placement,
Pending, deletion with eviction, and restart safety."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import kmock
import pytest
from tests.operator.harness import (
    ADAPTERS,
    EVENTS,
    NS,
    PODS,
    POOLS,
    SINCE,
    TOKEN,
    Kubelet,
    Stored,
    Trainers,
    adapter_manifest,
    create,
    delete,
    eventually,
    ip_of,
    live,
    patch,
    pool_manifest,
)

from lorafleet_api import adapters, wire
from lorafleet_operator.runtime import Runtime


def statuses(cluster: kmock.KubernetesEmulator) -> dict[str, dict[str, Any]]:
    return {name: obj.get("status") or {} for name, obj in live(cluster, ADAPTERS).items()}


def in_phase(cluster: kmock.KubernetesEmulator, name: str, phase: str) -> dict[str, Any] | None:
    """The adapter's status once it is in ``phase``, else None."""
    status = statuses(cluster).get(name, {})
    return status if status.get("phase") == phase else None


def all_ready(cluster: kmock.KubernetesEmulator, names: list[str]) -> dict[str, dict[str, Any]] | None:
    found = statuses(cluster)
    ok = all(found.get(n, {}).get("phase") == "Ready" for n in names)
    return found if ok else None


def events(cluster: kmock.KubernetesEmulator, reason: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in live(cluster, EVENTS).values()
        if e.get("reason") == reason and (name is None or e.get("involvedObject", {}).get("name") == name)
    ]


async def pool_ready(cluster: kmock.KubernetesEmulator, name: str, replicas: int) -> None:
    await eventually(
        lambda: (live(cluster, POOLS)[name].get("status") or {}).get("readyReplicas") == replicas,
        what=f"{replicas} ready pods",
    )


async def test_ten_adapters_spread_five_five_and_a_new_pod_gets_only_new_ones(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=2))
    await pool_ready(cluster, "demo", 2)
    first = [f"a{i}" for i in range(10)]
    for name in first:
        await create(cluster, ADAPTERS, adapter_manifest(name))
    found = await eventually(lambda: all_ready(cluster, first), timeout=60, what="10 Ready adapters")
    assert Counter(found[n]["pod"] for n in first) == {"demo-0": 5, "demo-1": 5}
    for name in first:
        status = found[name]
        ordinal = int(status["pod"].rsplit("-", 1)[1])
        assert status["endpoint"] == f"http://{ip_of(ordinal)}:{trainers.port}"
        assert status["epoch"] == 1
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "True"
        assert conditions["Placed"]["reason"] == "Placed"
        inits = trainers.inits(name)
        assert inits, name
        assert {(c.ip, c.body["epoch"]) for c in inits} == {(ip_of(ordinal), 1)}
        assert inits[0].body["lora"] == {
            "rank": 8,
            "alpha": 16.0,
            "dropout": 0.0,
            "target_modules": ["q_proj"],
        }
        assert inits[0].auth == f"Bearer {TOKEN}"

    # A third pod: warm caches stay where they are, new adapters go to the empty pod.
    await patch(cluster, POOLS, "demo", {"spec": {"replicas": 3}})
    await pool_ready(cluster, "demo", 3)
    later = ["b0", "b1", "b2"]
    for name in later:
        await create(cluster, ADAPTERS, adapter_manifest(name))
    found = await eventually(lambda: all_ready(cluster, first + later), timeout=60, what="new adapters Ready")
    assert {found[n]["pod"] for n in later} == {"demo-2"}
    assert Counter(found[n]["pod"] for n in first) == {"demo-0": 5, "demo-1": 5}
    assert {
        c.path.rsplit("/", 1)[1] for c in trainers.calls if c.ip == ip_of(2) and c.method == "PUT"
    } == set(later)
    pool_status = await eventually(
        lambda: (
            (s := live(cluster, POOLS)["demo"]["status"])
            and [p["adapters"] for p in s["pods"]] == [5, 5, 3]
            and s
        ),
        what="per-pod adapter counts",
    )
    assert pool_status["pods"][2].get("cacheBytes", 0) == 0  # an init caches nothing
    for name in later:  # a step each: the trainer caches them, and the pool shows the bytes
        trainers.train(ip_of(2), name, version=1, cache_bytes=1000)
    await eventually(
        lambda: live(cluster, POOLS)["demo"]["status"]["pods"][2].get("cacheBytes") == 3000,
        what="the cache bytes of demo-2",
    )


async def test_deleting_a_pod_replaces_its_adapters_with_epoch_two(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=2))
    await pool_ready(cluster, "demo", 2)
    names = [f"a{i}" for i in range(4)]
    for name in names:
        await create(cluster, ADAPTERS, adapter_manifest(name))
    found = await eventually(lambda: all_ready(cluster, names), what="4 Ready")
    moved = sorted(n for n in names if found[n]["pod"] == "demo-0")
    stayed = sorted(n for n in names if found[n]["pod"] == "demo-1")
    assert len(moved) == 2 and len(stayed) == 2

    kubelet.unready.add("demo-0")  # the replacement pod does not become Ready in this test
    await delete(cluster, PODS, "demo-0")
    found = await eventually(
        lambda: (
            (s := statuses(cluster))
            and all(s[n].get("epoch") == 2 and s[n].get("phase") == "Ready" for n in moved)
            and s
        ),
        what="re-placed with epoch 2",
    )
    assert {found[n]["pod"] for n in moved} == {"demo-1"}
    assert all(found[n]["epoch"] == 1 and found[n]["pod"] == "demo-1" for n in stayed)
    for name in moved:
        assert [c.body["epoch"] for c in trainers.inits(name) if c.ip == ip_of(1)] == [2]
        (event,) = await eventually(
            lambda n=name: events(cluster, "Rescheduled", n), what="Rescheduled event"
        )
        assert "epoch 2" in event["message"] and event["type"] == "Warning"
    assert operator.metrics.reschedules._value.get() == 2


async def test_no_ready_pod_leaves_adapter_pending_until_one_is_ready(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    kubelet.unready.add("demo-0")
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    status = await eventually(lambda: in_phase(cluster, "alice", "Pending"), what="Pending")
    placed = {c["type"]: c for c in status["conditions"]}["Placed"]
    assert (placed["status"], placed["reason"]) == ("False", "NoReadyPod")
    assert "no Ready pod" in placed["message"]
    assert trainers.inits("alice") == []
    kubelet.unready.discard("demo-0")
    status = await eventually(lambda: all_ready(cluster, ["alice"]), what="placed once a pod is Ready")
    assert status["alice"]["pod"] == "demo-0" and status["alice"]["epoch"] == 1


async def test_missing_pool_is_pending_with_reason(
    cluster: kmock.KubernetesEmulator, operator: Runtime
) -> None:
    await create(cluster, ADAPTERS, adapter_manifest("orphan", pool="nope"))
    status = await eventually(
        lambda: statuses(cluster).get("orphan", {}).get("conditions") and statuses(cluster)["orphan"],
        what="status",
    )
    assert status["phase"] == "Pending"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Placed"] == "PoolNotFound"


async def test_delete_sends_one_eviction_to_the_holding_pod(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=2))
    await pool_ready(cluster, "demo", 2)
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    await create(cluster, ADAPTERS, adapter_manifest("carol", deletionPolicy="Delete"))
    found = await eventually(lambda: all_ready(cluster, ["alice", "carol"]), what="Ready")
    holder = ip_of(int(found["alice"]["pod"].rsplit("-", 1)[1]))
    trainers.train(holder, "alice", version=1)  # a step: the trainer caches alice
    await delete(cluster, ADAPTERS, "alice")
    await eventually(lambda: "alice" not in live(cluster, ADAPTERS), what="alice gone")
    evictions = trainers.of("DELETE", f"/v1/adapters/{NS}/alice/cache")
    assert [c.ip for c in evictions] == [holder]
    assert (NS, "alice") in trainers.adapters[holder]  # Retain: evicted from the cache, still stored
    assert not trainers.adapters[holder][(NS, "alice")].cached
    await eventually(lambda: events(cluster, "Evicted", "alice"), what="Evicted event")
    # deletionPolicy: Delete removes the stored adapter instead (one call, no separate eviction).
    await delete(cluster, ADAPTERS, "carol")
    await eventually(lambda: "carol" not in live(cluster, ADAPTERS), what="carol gone")
    assert len(trainers.of("DELETE", f"/v1/adapters/{NS}/carol")) == 1
    assert trainers.of("DELETE", f"/v1/adapters/{NS}/carol/cache") == []
    assert operator.metrics.evictions.labels(outcome="evicted")._value.get() == 1
    assert operator.metrics.evictions.labels(outcome="deleted")._value.get() == 1


async def test_delete_with_the_pod_gone_releases_at_once(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    await eventually(lambda: all_ready(cluster, ["alice"]), what="Ready")
    # Stop the operator's view of the pod: it is deleted and its replacement never becomes Ready.
    kubelet.unready.add("demo-0")
    await patch(cluster, POOLS, "demo", {"spec": {"replicas": 0}})
    await eventually(lambda: "demo-0" not in live(cluster, PODS), what="pod gone")
    await delete(cluster, ADAPTERS, "alice")
    await eventually(lambda: "alice" not in live(cluster, ADAPTERS), timeout=15, what="alice released")
    assert trainers.of("DELETE", "/cache") == []
    (event,) = await eventually(lambda: events(cluster, "CacheGone", "alice"), what="CacheGone event")
    assert "demo-0 is gone" in event["message"]


async def test_delete_with_a_failing_trainer_releases_after_the_timeout(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    await eventually(lambda: all_ready(cluster, ["alice"]), what="Ready")
    trainers.failing.add(ip_of(0))
    loop_time = asyncio.get_running_loop().time
    started = loop_time()
    await delete(cluster, ADAPTERS, "alice")
    await eventually(
        lambda: "alice" not in live(cluster, ADAPTERS), timeout=30, what="released after timeout"
    )
    assert loop_time() - started >= operator.settings.eviction_timeout_seconds
    # It retried before giving up (unpublishing comes first, then the eviction).
    assert len([c for c in trainers.of("DELETE") if c.path.startswith(f"/v1/adapters/{NS}/alice/")]) >= 2
    (event,) = await eventually(lambda: events(cluster, "EvictionTimedOut", "alice"), what="timeout event")
    assert event["type"] == "Warning" and "503" in event["message"]


async def test_restart_places_nothing_twice_and_loses_no_deletion(
    cluster: kmock.KubernetesEmulator, start_operator: Any, spare_cluster: Any, trainers: Trainers
) -> None:
    names = ["a0", "a1", "a2"]
    async with start_operator():
        await create(cluster, POOLS, pool_manifest("demo", replicas=2))
        await pool_ready(cluster, "demo", 2)
        for name in names:
            await create(cluster, ADAPTERS, adapter_manifest(name))
        before = await eventually(lambda: all_ready(cluster, names), what="Ready before restart")
    # The cluster state moves to a fresh emulator: when kopf stops in this event loop it cancels
    # every task started after it, kmock's own request tasks included, and that emulator was seen
    # to stop answering. The restarted operator finds exactly what the first one left behind.
    async with spare_cluster() as restarted:
        for key, obj in list(cluster.objects.items()):
            if not obj.deleted:
                restarted.objects[key] = dict(obj.raw)
        # While no operator runs, an adapter is deleted: its finalizer keeps it until one is back.
        await delete(restarted, ADAPTERS, "a2")
        assert "a2" in live(restarted, ADAPTERS)
        inits_before = len(trainers.of("PUT"))
        polls = {n: f"/v1/adapters/{NS}/{n}" for n in ["a0", "a1"]}  # only the resync timer polls
        polls_before = {n: len(trainers.of("GET", path)) for n, path in polls.items()}
        async with start_operator(restarted) as second:
            await eventually(
                lambda: "a2" not in live(restarted, ADAPTERS), what="deletion done after restart"
            )
            ready = second.metrics.adapters.labels(phase="Ready")
            await eventually(lambda: ready._value.get() == 2, what="resumed")
            # The timers have looked again: a second poll of each adapter means its timer's first
            # pass after the restart is over (one object's timer runs its passes one at a time).
            await eventually(
                lambda: all(len(trainers.of("GET", p)) >= polls_before[n] + 2 for n, p in polls.items()),
                what="a whole resync pass of each adapter after the restart",
            )
        after = statuses(restarted)
    for name in ["a0", "a1"]:
        assert (after[name]["pod"], after[name]["epoch"]) == (before[name]["pod"], before[name]["epoch"])
    assert len(trainers.of("PUT")) == inits_before  # nothing placed or initialised again
    assert len(trainers.of("DELETE", f"/v1/adapters/{NS}/a2/cache")) == 1


async def test_trainer_refusing_the_config_fails_the_adapter(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    # The store already holds "alice" with another shape (e.g. created by an earlier object).
    other = adapters.Lora(rank=64)
    trainers.adapters[ip_of(0)] = {(NS, "alice"): Stored(other, epoch=1, version=9)}
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    status = await eventually(lambda: in_phase(cluster, "alice", "Failed"), what="Failed")
    initialized = {c["type"]: c for c in status["conditions"]}["Initialized"]
    assert (initialized["status"], initialized["reason"]) == ("False", "InitRejected")
    assert "409" in initialized["message"] and "lora" in initialized["message"]
    await eventually(lambda: events(cluster, "InitRejected", "alice"), what="InitRejected event")


async def test_recreated_adapter_takes_over_its_retained_weights_with_the_next_epoch(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    # An earlier "alice" (deleted with Retain) was trained at epoch 3; the store kept it.
    manifest = adapter_manifest("alice")
    lora = wire.init_request(adapters.parse_spec(manifest), 1).lora
    trainers.adapters[ip_of(0)] = {(NS, "alice"): Stored(lora, epoch=3, version=9)}
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    await create(cluster, ADAPTERS, manifest)
    status = await eventually(lambda: in_phase(cluster, "alice", "Ready"), what="Ready")
    assert status["epoch"] == 4 and status["pod"] == "demo-0"
    # Refused at epoch 1, then placed again with the epoch after the stored one, once.
    assert [c.body["epoch"] for c in trainers.inits("alice")] == [1, 4]
    assert trainers.adapters[ip_of(0)][(NS, "alice")].version == 9  # the weights were kept
    placed = {c["type"]: c for c in status["conditions"]}["Placed"]
    assert placed["reason"] == "EpochAdvanced" and "epoch 3" in placed["message"]
    await eventually(lambda: events(cluster, "EpochAdvanced", "alice"), what="EpochAdvanced event")


async def test_scale_down_replaces_adapters_of_removed_pods(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=2))
    await pool_ready(cluster, "demo", 2)
    names = ["a0", "a1", "a2", "a3"]
    for name in names:
        await create(cluster, ADAPTERS, adapter_manifest(name))
    before = await eventually(lambda: all_ready(cluster, names), what="Ready")
    moved = [n for n in names if before[n]["pod"] == "demo-1"]
    await patch(cluster, POOLS, "demo", {"spec": {"replicas": 1}})
    after = await eventually(
        lambda: (
            (s := statuses(cluster))
            and all(s[n].get("pod") == "demo-0" and s[n]["phase"] == "Ready" for n in names)
            and s
        ),
        what="all on demo-0",
    )
    assert sorted(n for n in names if after[n]["epoch"] == 2) == sorted(moved)
    assert "demo-1" not in live(cluster, PODS)


async def test_pod_not_ready_beyond_the_grace_period_moves_its_adapters(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=2))
    await pool_ready(cluster, "demo", 2)
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    first = (await eventually(lambda: all_ready(cluster, ["alice"]), what="Ready"))["alice"]
    ordinal = int(first["pod"].rsplit("-", 1)[1])
    not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    await kubelet.patch(NS, first["pod"], not_ready)
    # Within the grace period the adapter waits where its cache is warm...
    waiting = await eventually(
        lambda: (
            (s := statuses(cluster)["alice"])
            and {c["type"]: c["reason"] for c in s["conditions"]}["Ready"] == "PodNotReady"
            and s
        ),
        what="PodNotReady",
    )
    assert waiting["pod"] == first["pod"] and waiting["epoch"] == 1
    # ...and after it, moves to the other pod with the next epoch.
    moved = await eventually(
        lambda: (s := statuses(cluster)["alice"]) and s.get("epoch") == 2 and s["phase"] == "Ready" and s,
        what="moved after grace",
    )
    assert moved["pod"] == f"demo-{1 - ordinal}"


async def test_a_pod_without_the_stored_weights_shows_the_loss(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    # Each recording trainer keeps its own adapters, as pods of an ephemeral pool do.
    await create(cluster, POOLS, pool_manifest("demo", replicas=2, storage={"ephemeral": True}))
    await pool_ready(cluster, "demo", 2)
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    first = (await eventually(lambda: all_ready(cluster, ["alice"]), what="Ready"))["alice"]
    assert {c["type"]: c["reason"] for c in first["conditions"]}["WeightsStored"] == "Created"
    trainers.train(ip_of(int(first["pod"].rsplit("-", 1)[1])), "alice", version=5)
    await eventually(lambda: statuses(cluster)["alice"].get("version") == 5, what="version 5 polled")
    kubelet.unready.add(first["pod"])  # its replacement does not become Ready: alice moves
    await delete(cluster, PODS, first["pod"])
    moved = await eventually(
        lambda: (s := statuses(cluster)["alice"]) and s.get("epoch") == 2 and s["phase"] == "Ready" and s,
        what="re-placed",
    )
    assert (moved["version"], moved["lostVersion"]) == (0, 5)
    weights = {c["type"]: c for c in moved["conditions"]}["WeightsStored"]
    assert (weights["status"], weights["reason"]) == ("False", "StorageLost")
    (event,) = await eventually(lambda: events(cluster, "StorageLost", "alice"), what="StorageLost event")
    assert event["type"] == "Warning" and "version 5 is lost" in event["message"]


async def test_a_trainer_answer_without_a_version_leaves_the_status_as_it_was(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    await create(cluster, ADAPTERS, adapter_manifest("alice"))
    await eventually(lambda: all_ready(cluster, ["alice"]), what="Ready")
    trainers.train(ip_of(0), "alice", version=5)
    await eventually(lambda: statuses(cluster)["alice"].get("version") == 5, what="version 5 polled")
    errors = operator.metrics.reconcile_errors.labels(path="adapter_poll")
    before = errors._value.get()
    trainers.dropping.add("version")
    trainers.train(ip_of(0), "alice", version=6)
    polls = len(trainers.of("GET", f"/v1/adapters/{NS}/alice"))
    # Two more polls answered without a version: each is an error the operator counts and skips.
    await eventually(
        lambda: (
            len(trainers.of("GET", f"/v1/adapters/{NS}/alice")) >= polls + 2
            and errors._value.get() >= before + 2
        ),
        what="two polls refused",
    )
    status = statuses(cluster)["alice"]
    assert status["version"] == 5 and status["phase"] == "Ready", status
    trainers.dropping.clear()  # a trainer that answers in full again is read again
    await eventually(lambda: statuses(cluster)["alice"].get("version") == 6, what="version 6 polled")


def vllm_pod(name: str) -> dict[str, Any]:
    """An inference server pod that pools selecting app=vllm publish to."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "vllm"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
    }


def _served(status: dict[str, Any]) -> dict[str, Any]:
    return {c["type"]: c for c in status.get("conditions") or []}.get("Served", {})


async def test_what_the_trainer_publishes_shows_in_the_status_until_the_adapter_is_unpublished(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    selector = {"matchLabels": {"app": "vllm"}}
    await create(cluster, POOLS, pool_manifest("demo", replicas=1, serving={"selector": selector}))
    await create(cluster, PODS, vllm_pod("vllm-5"))
    await create(cluster, ADAPTERS, adapter_manifest("alice", serving={"name": "alice-v1"}))

    def shows(version: int) -> dict[str, Any] | None:
        status = statuses(cluster)["alice"]
        ok = (
            status.get("servedName") == "alice-v1"
            and status.get("served") == [{"server": "vllm-5", "version": version, "since": SINCE}]
            and status.get("artifact") == f"{NS}/.alice.v{version:08d}"
            and _served(status).get("status") == "True"
        )
        return status if ok else None

    await eventually(lambda: shows(0), what="alice served at version 0")
    # The trainer was told the selected server (not the trainer pod) and alice's served name.
    told = trainers.serving[ip_of(0)]
    assert [s.name for s in told.servers] == ["vllm-5"]
    assert [(a.name, a.served_name) for a in told.adapters] == [("alice", "alice-v1")]
    trainers.train(ip_of(0), "alice", version=2)
    await eventually(lambda: shows(2), what="alice served at version 2")

    trainers.refusing["vllm-5"] = "rank 64 is above the server's --max-lora-rank 16"
    failed = await eventually(
        lambda: (c := _served(statuses(cluster)["alice"])).get("reason") == "PublishFailed" and c,
        what="PublishFailed",
    )
    assert failed["status"] == "False" and "max-lora-rank" in failed["message"]
    await eventually(lambda: events(cluster, "PublishFailed", "alice"), what="PublishFailed event")

    await delete(cluster, ADAPTERS, "alice")
    await eventually(lambda: "alice" not in live(cluster, ADAPTERS), what="alice gone")
    unpublished = trainers.of("DELETE", f"/v1/adapters/{NS}/alice/serving")
    assert [c.ip for c in unpublished] == [ip_of(0)]


async def test_a_served_name_taken_in_the_namespace_is_not_published_until_it_is_free(
    cluster: kmock.KubernetesEmulator, operator: Runtime, trainers: Trainers, kubelet: Kubelet
) -> None:
    selector = {"matchLabels": {"app": "vllm"}}
    await create(cluster, POOLS, pool_manifest("demo", replicas=1, serving={"selector": selector}))
    await create(cluster, PODS, vllm_pod("vllm-7"))
    await create(cluster, ADAPTERS, adapter_manifest("alice", serving={"name": "shared"}))
    await eventually(lambda: _served(statuses(cluster)["alice"]).get("status") == "True", what="alice served")
    await create(cluster, ADAPTERS, adapter_manifest("bob", serving={"name": "shared"}))

    def waits() -> bool:
        condition = _served(statuses(cluster).get("bob", {}))
        return (
            condition.get("reason") == "ServedNameTaken" and "held by adapter alice" in condition["message"]
        )

    await eventually(waits, what="bob waits for the name")
    await eventually(lambda: events(cluster, "ServedNameTaken", "bob"), what="a ServedNameTaken event")
    # bob was placed and trained, but published under the name neither at its init nor later.
    inits = [c.body for c in trainers.inits("bob")]
    assert inits and all(body.get("serving") is None for body in inits), inits
    assert [(a.name, a.served_name) for a in trainers.serving[ip_of(0)].adapters] == [("alice", "shared")]
    assert statuses(cluster)["alice"]["servedName"] == "shared"

    await delete(cluster, ADAPTERS, "alice")

    def bob_published() -> bool:
        told = trainers.serving[ip_of(0)].adapters
        status = statuses(cluster).get("bob", {})
        return [(a.name, a.served_name) for a in told] == [("bob", "shared")] and (
            status.get("servedName") == "shared" and _served(status).get("status") == "True"
        )

    await eventually(bob_published, what="bob published once alice is gone")


# The adapter stays on its lost pod while the test runs.
@pytest.mark.operator_settings(replace_grace_seconds=3600.0)
async def test_an_adapter_deleted_while_its_pod_is_gone_is_unloaded_through_another_pod(
    cluster: kmock.KubernetesEmulator, start_operator: Any, trainers: Trainers, kubelet: Kubelet
) -> None:
    async with start_operator():
        selector = {"matchLabels": {"app": "vllm"}}
        await create(cluster, POOLS, pool_manifest("demo", replicas=2, serving={"selector": selector}))
        await create(cluster, PODS, vllm_pod("vllm-9"))
        await pool_ready(cluster, "demo", 2)
        await create(cluster, ADAPTERS, adapter_manifest("alice", serving={"name": "alice-v1"}))
        await eventually(lambda: _served(statuses(cluster)["alice"]).get("status") == "True", what="served")
        lost = statuses(cluster)["alice"]["pod"]
        other = "demo-1" if lost == "demo-0" else "demo-0"
        kubelet.unready.add(lost)
        await delete(cluster, PODS, lost)  # its replacement never becomes Ready
        await delete(cluster, ADAPTERS, "alice")
        await eventually(lambda: "alice" not in live(cluster, ADAPTERS), what="alice released")
        (call,) = trainers.of("DELETE", f"/v1/adapters/{NS}/alice/serving")
        assert call.ip == ip_of(int(other[-1])) and call.query == {"served_name": "alice-v1"}
        (event,) = await eventually(lambda: events(cluster, "Unpublished", "alice"), what="Unpublished event")
        assert "vllm-9" in event["message"] and other in event["message"]


# No timer polls while the test runs: only the followed changes can move the status.
@pytest.mark.operator_settings(resync_seconds=3600.0)
async def test_the_status_follows_each_commit_without_waiting_for_the_resync(
    cluster: kmock.KubernetesEmulator, start_operator: Any, trainers: Trainers, kubelet: Kubelet
) -> None:
    async with start_operator() as rt:
        await create(cluster, POOLS, pool_manifest("demo", replicas=1))
        await create(cluster, ADAPTERS, adapter_manifest("alice"))
        await eventually(lambda: all_ready(cluster, ["alice"]), what="Ready")
        polls = len(trainers.of("GET", f"/v1/adapters/{NS}/alice"))
        for version in (1, 2, 5):
            trainers.train(ip_of(0), "alice", version=version)
            status = await eventually(
                lambda v=version: (s := statuses(cluster)["alice"]).get("version") == v and s,
                what=f"version {version} followed",
            )
            assert status["artifact"] == f"{NS}/.alice.v{version:08d}" and status["cached"] is True
        assert len(trainers.of("GET", f"/v1/adapters/{NS}/alice")) == polls  # no poll did it
        assert ("demo", "demo-0") not in rt.followers and (NS, "demo-0") in rt.followers
        # A trainer without the route (an older image) is left to the resync: nothing breaks.
        trainers.quiet.add(ip_of(0))
        await eventually(lambda: rt.followers[(NS, "demo-0")].task.done(), what="the follower stops")
