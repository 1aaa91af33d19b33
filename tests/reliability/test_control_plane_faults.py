"""Control-plane faults on a real API server: a killed operator, a lost pod, restarted etcd and API server.

One release of the chart, one pool whose two trainer pods share a claim. The operator is killed
(`kill -9`, restarted as a crashed container) in the middle of placing, re-placing and deleting
adapters; a trainer pod is lost in the middle of a step; the API server and etcd are killed and
restarted while adapters are created and deleted. After each, the final state must be right:
every adapter placed exactly once (its epoch counts its placements), every deleted adapter gone
(no finalizer left) with its cache entry evicted, the lost step either durable or not at all.
`make test` injects each fault once; the chaos suite (`make test-chaos`) repeats them, seeded.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.reliability import faults, stored
from tests.reliability.fleetstate import CLAIM, Faulty, adapter_manifest, count, placed, ready

from lorafleet_local.fleet import feedback_for
from lorafleet_local.kube import CommandError, Kube
from lorafleet_local.polling import eventually
from lorafleet_trainer.engine.holds import PhaseHolds

pytestmark = pytest.mark.e2e


def _name(adapter: dict[str, Any]) -> str:
    return str(adapter["metadata"]["name"])


# ---- killed operator during placement ------------------------------------------------------------


def _placement(faulty: Faulty, prefix: str, rounds: int, per_round: int, seed: int) -> None:
    rng = random.Random(seed)
    for r in range(rounds):
        names = [f"{prefix}{r}-{i}" for i in range(per_round)]
        target = rng.randrange(1, per_round)  # kill once this many are placed
        faulty.apply(names)
        at_kill = faulty.kill_operator_when(
            "placement", names, lambda seen, n=names, t=target: count(seen, n, placed) >= t
        )
        assert count(at_kill, names, ready) < per_round, "every adapter was Ready before the kill"
        seen = faulty.wait_ready(names)
        faulty.settled()
        faulty.assert_placed_once(seen, {n: 1 for n in names})


def test_killed_operator_during_placement_places_each_adapter_once(faulty: Faulty) -> None:
    _placement(faulty, "place", rounds=1, per_round=8, seed=3)


@pytest.mark.chaos
def test_chaos_killed_operator_during_placement(faulty: Faulty) -> None:
    _placement(faulty, "cplace", rounds=6, per_round=8, seed=13)


# ---- killed operator during re-placement ---------------------------------------------------------


def _replacement(faulty: Faulty, prefix: str, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    names = [f"{prefix}-{i}" for i in range(8)]
    faulty.apply(names)
    faulty.wait_ready(names)
    for _ in range(rounds):
        _wait_two_ready_pods(faulty)
        _lose_the_busiest_pod(faulty, names, rng)


def _lose_the_busiest_pod(faulty: Faulty, names: list[str], rng: random.Random) -> None:
    seen = faulty.adapters()
    victim, _ = collections.Counter(seen[n]["status"]["pod"] for n in names).most_common(1)[0]
    moved = [n for n in names if seen[n]["status"]["pod"] == victim]
    before = {n: int(seen[n]["status"]["epoch"]) for n in names}
    target = rng.randrange(0, len(moved))  # kill the operator once this many have moved

    def has_moved(adapter: dict[str, Any]) -> bool:
        return bool(adapter["status"]["epoch"] > before[_name(adapter)])

    faults.lose_pod(faulty.fleet.kube, faulty.ns, victim)
    at_kill = faulty.kill_operator_when(
        "re-placement", moved, lambda seen: count(seen, moved, has_moved) >= target
    )
    settled = count(at_kill, moved, lambda a: ready(a) and has_moved(a))
    assert settled < len(moved), "every adapter had moved before the kill"
    expected = {n: before[n] + (1 if n in moved else 0) for n in names}
    seen = faulty.wait_ready(names, beyond={n: before[n] for n in moved})
    faulty.settled()
    faulty.assert_placed_once(seen, expected)


def _wait_two_ready_pods(faulty: Faulty) -> None:
    eventually("the pool to have two Ready pods", lambda: len(faulty.ready_pods()) == 2, timeout=600)


def test_killed_operator_during_replacement_moves_each_adapter_once(faulty: Faulty) -> None:
    _replacement(faulty, "move", rounds=1, seed=5)


@pytest.mark.chaos
def test_chaos_killed_operator_during_replacement(faulty: Faulty) -> None:
    _replacement(faulty, "cmove", rounds=4, seed=15)


def test_recreated_adapter_takes_over_its_retained_weights(faulty: Faulty) -> None:
    # Trained, then moved once by a pod loss: the claim holds it at epoch 2.
    name = "retained"
    faulty.apply([name])
    faulty.wait_ready([name])
    _wait_two_ready_pods(faulty)
    faults.lose_pod(faulty.fleet.kube, faulty.ns, faulty.adapters()[name]["status"]["pod"])
    seen = faulty.wait_ready([name], beyond={name: 1})
    version = faulty.train(name)["version"]
    epoch = seen[name]["status"]["epoch"]
    # Deleted with the default deletionPolicy (Retain) and applied again under the same name.
    faulty.delete([name])
    faulty.wait_gone([name])
    faulty.apply([name])
    seen = faulty.wait_ready([name])
    assert seen[name]["status"]["epoch"] == epoch + 1, seen[name]["status"]
    code, state = faulty.fleet.call("GET", faulty.fleet.adapter_url(name))
    assert code == 200 and state["version"] == version, state
    assert faulty.train(name)["version"] == version + 1


# ---- killed operator during deletion -------------------------------------------------------------


def _deletion(faulty: Faulty, prefix: str, rounds: int, per_round: int, seed: int) -> None:
    rng = random.Random(seed)
    for r in range(rounds):
        names = [f"{prefix}{r}-{i}" for i in range(per_round)]
        faulty.apply(names)
        seen = faulty.wait_ready(names)
        for name in names:
            faulty.train(name)
        for name in names:
            assert f"{faulty.ns}/{name}" in faulty.fleet.cached(seen[name]["status"]["pod"])
        # One delete at a time from a thread, so the kill falls among deletions still to come,
        # in flight and done; the operator evicts in well under a second otherwise.
        target = rng.randrange(1, per_round)  # kill once this many are gone
        deleter = threading.Thread(target=lambda n=names: [faulty.delete([x]) for x in n], name="deleter")
        deleter.start()
        at_kill = faulty.kill_operator_when(
            "deletion", names, lambda seen, n=names, t=target: sum(1 for x in n if x not in seen) >= t
        )
        deleter.join(timeout=120)
        assert sum(1 for n in names if n not in at_kill) < per_round, "every adapter was gone before the kill"
        faulty.wait_gone(names)  # an adapter with a finalizer left behind would never go
        faulty.settled()
        faulty.assert_evicted(names)


def test_killed_operator_during_deletion_evicts_and_releases_every_adapter(faulty: Faulty) -> None:
    _deletion(faulty, "del", rounds=1, per_round=6, seed=7)


@pytest.mark.chaos
def test_chaos_killed_operator_during_deletion(faulty: Faulty) -> None:
    _deletion(faulty, "cdel", rounds=5, per_round=6, seed=17)


# ---- pod loss mid-step ---------------------------------------------------------------------------

# Where each moment parks the step (lorafleet_trainer.engine.holds) and how the step must end when the pod
# is lost there: before the compute nothing is written ("absent"); parked right after the new
# version is durable on the claim, before the answer, the step is kept but the client never hears.
_MOMENTS = {"compute": ("compute", "absent"), "written": ("snapshot", "durable")}


def _pod_loss(faulty: Faulty, name: str, moments: list[str]) -> collections.Counter[str]:
    """Lose the adapter's pod once per entry of ``moments`` (a key of ``_MOMENTS``), with the step
    parked at that moment by the pod's step holds. Returns how each loss ended for the step."""
    fleet = faulty.fleet
    runner = fleet.kube.runner
    if runner is None:
        pytest.skip("parking a step at a known phase needs the local pod runner's step holds")
    faulty.apply([name])
    faulty.wait_ready([name])
    acked = faulty.train(name)["version"]
    outcomes: collections.Counter[str] = collections.Counter()
    for moment in moments:
        phase, expected = _MOMENTS[moment]
        _wait_two_ready_pods(faulty)
        before = fleet.adapter(name)["status"]
        worker = runner.worker(faulty.ns, before["pod"])
        assert worker is not None, f"the pod runner does not run {before['pod']}"
        holds = PhaseHolds(worker.hold_dir)
        holds.arm(phase)
        url = fleet.adapter_url(name)
        answer: dict[str, Any] = {}

        def post_step(url: str = url, answer: dict[str, Any] = answer) -> None:
            try:
                answer["code"], answer["body"] = fleet.call("POST", url + "/distill", feedback_for(name))
            except OSError as exc:  # the connection died with the pod
                answer["error"] = repr(exc)

        client = threading.Thread(target=post_step)
        client.start()
        eventually(f"the step to park before {phase}", lambda h=holds, p=phase: h.held(p), timeout=120)
        faults.lose_pod(fleet.kube, faulty.ns, before["pod"])
        client.join(timeout=180)
        assert not client.is_alive()
        assert "code" not in answer, f"a step parked before {phase} was answered: {answer}"

        status = faulty.wait_ready([name], beyond={name: before["epoch"]})[name]["status"]
        assert status["podUID"] != before["podUID"], status
        code, state = fleet.call("GET", fleet.adapter_url(name, status))
        assert code == 200 and state["epoch"] == status["epoch"], state
        durable = int(state["version"])
        outcome = "durable" if durable == acked + 1 else "absent"
        assert durable in (acked, acked + 1), (acked, answer, state)
        assert outcome == expected, f"lost the pod before {phase}: the step is {outcome}, not {expected}"
        outcomes[f"{moment}: error, {outcome}"] += 1
        stored.assert_whole(_claim_dir(fleet.kube), faulty.ns, name, durable)
        # The new pod starts from the durable version, from storage (its cache never held it).
        step = faulty.train(name)
        assert step["version"] == durable + 1 and step["cache"] == "miss", step
        acked = step["version"]
    print(f"\npod losses mid-step {name}: {dict(outcomes)}")
    return outcomes


def _claim_dir(kube: Kube) -> Path:
    """Where the pool's claim lives on this machine (local control plane only)."""
    assert kube.runner is not None
    return kube.runner.workdir / "claims" / CLAIM


def test_pod_lost_mid_step_is_an_error_and_the_next_step_starts_from_the_durable_version(
    faulty: Faulty,
) -> None:
    outcomes = _pod_loss(faulty, "midstep", ["compute", "written"])
    assert outcomes == {"compute: error, absent": 1, "written: error, durable": 1}, outcomes


@pytest.mark.chaos
def test_chaos_pods_lost_mid_step(faulty: Faulty) -> None:
    outcomes = _pod_loss(faulty, "cmidstep", ["compute", "written"] * 3)
    assert outcomes == {"compute: error, absent": 3, "written: error, durable": 3}, outcomes


# ---- API server and etcd restarts ----------------------------------------------------------------


def _until_accepted(what: str, action: Callable[[], object], timeout: float = 180) -> None:
    """Repeat a kubectl action while the control plane is down (each one is idempotent)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
            return
        except CommandError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} was never accepted: {exc}") from exc
            time.sleep(0.5)


class _Churn(threading.Thread):
    """Creates ``keep`` and deletes ``gone`` (half after the third create, half after the fifth),
    one kubectl call at a time. Before the calls named in ``gates`` it stops until the gate opens,
    so a restart lands between two known calls: after the ones done, before the ones to come."""

    def __init__(self, kube: Kube, ns: str, keep: list[str], gone: list[str], gates: set[int]) -> None:
        super().__init__(name="churn")
        self.kube, self.keep, self.gone = kube, keep, gone
        self.flags = ("-n", ns, "--request-timeout=10s")
        self.gates = {n: threading.Event() for n in gates}
        self.reached = {n: threading.Event() for n in gates}
        self.failures: list[BaseException] = []
        self.calls = 0

    def _call(self, what: str, *args: str, input: str | None = None) -> None:
        if self.calls in self.gates:
            self.reached[self.calls].set()
            self.gates[self.calls].wait(600)
        _until_accepted(what, lambda: self.kube.kubectl(*args, *self.flags, input=input, timeout=30))
        self.calls += 1

    def run(self) -> None:
        try:
            for i, name in enumerate(self.keep):
                self._call(f"create {name}", "apply", "-f", "-", input=adapter_manifest([name]))
                if i in (2, 4):
                    batch = self.gone[:2] if i == 2 else self.gone[2:]
                    self._call(
                        f"delete {batch}",
                        "delete",
                        "loraadapter",
                        *batch,
                        "--wait=false",
                        "--ignore-not-found",
                    )
        except BaseException as exc:
            self.failures.append(exc)


def _restarts(faulty: Faulty, prefix: str, plan: list[tuple[str, float, int]]) -> dict[str, Any]:
    """Restart each ``(component, seconds down, after this many churn calls)`` of ``plan``."""
    kube = faulty.fleet.kube
    if kube.plane is None:
        pytest.skip("restarting the API server and etcd needs the local control plane")
    keep = [f"{prefix}-keep-{i}" for i in range(6)]
    gone = [f"{prefix}-gone-{i}" for i in range(4)]
    faulty.apply(gone)
    faulty.wait_ready(gone)
    for name in gone:
        faulty.train(name)
    restarts_before = faulty.operator_restarts()
    churn = _Churn(kube, faulty.ns, keep, gone, {after for _, _, after in plan})
    start = time.monotonic()
    churn.start()
    downtime = []
    for component, down, after in plan:
        assert churn.reached[after].wait(600), f"the churn never reached call {after}: {churn.failures}"
        # The next call is let go only once the component is dead, so it meets the outage.
        took = faults.restart(kube, component, down=down, on_down=churn.gates[after].set)
        downtime.append((component, down, after, round(took, 1)))
    churn.join(timeout=600)
    assert not churn.is_alive() and not churn.failures, churn.failures
    seen = faulty.wait_ready(keep, timeout=600)
    faulty.wait_gone(gone, timeout=300)
    settled = time.monotonic() - start
    faulty.assert_placed_once(seen, {n: 1 for n in keep})
    faulty.assert_evicted(gone)
    # The watches are live again: a new adapter is placed from its create event, well within a resync.
    after = f"{prefix}-after"
    fresh = time.monotonic()
    faulty.apply([after])
    faulty.wait_ready([after], timeout=25)
    figures = {
        "restarts": downtime,
        "settled_s": round(settled, 1),
        "new_adapter_ready_s": round(time.monotonic() - fresh, 1),
        "operator_restarts": faulty.operator_restarts() - restarts_before,
    }
    print(f"\ncontrol-plane restarts {prefix}: {figures}")
    return figures


def test_api_server_and_etcd_restarts_during_creates_and_deletes(faulty: Faulty) -> None:
    # The API server goes down before the third create, etcd right after the first deletes, before
    # the fourth create: both outages fall among the operator's placements and finalizers.
    _restarts(faulty, "churn", [("kube-apiserver", 2.0, 2), ("etcd", 2.0, 4)])


@pytest.mark.chaos
def test_chaos_long_control_plane_outages(faulty: Faulty) -> None:
    # 20 s is longer than the operator's 15 s Lease: it must give up leading, exit and come back.
    _restarts(
        faulty,
        "cchurn",
        [("etcd", 5.0, 1), ("kube-apiserver", 20.0, 3), ("etcd", 20.0, 5), ("kube-apiserver", 0.0, 7)],
    )
