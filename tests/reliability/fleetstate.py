"""A LoraFleet release under fault injection: its adapters, pods and operator, read and checked.

The control-plane fault tests kill the operator, lose trainer pods and restart the API server and
etcd; this module holds what they share: a pool whose pods keep adapters on one claim (so a lost
pod loses no stored state), fast reads of the adapters, a kill that lands when a predicate on
the adapters first holds, and the checks of the final state: every adapter placed exactly once
(its epoch counts its placements, on the API object and on the trainer), every deleted adapter
gone with its finalizer and its cache entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.reliability import faults

from lorafleet_local.fleet import Fleet, feedback_for
from lorafleet_local.polling import eventually

FAULTS_NAMESPACE = "lorafleet-faults"
POOL = "durable"
CLAIM = "durable-adapters"
API = "/apis/lorafleet.io/v1alpha1"

# One claim for the pool's pods: a pod that is lost leaves its adapters' stored versions behind.
# ReadWriteOnce is enough on a one-node cluster (kind); locally the pod runner shares a directory.
POOL_MANIFEST = f"""\
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {CLAIM}
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
---
apiVersion: lorafleet.io/v1alpha1
kind: TrainerPool
metadata:
  name: {POOL}
spec:
  baseModel: builtin:tiny
  replicas: 2
  gpu: false
  cache:
    capacity: 256Mi
  maxAdaptersPerPod: 64
  storage:
    persistentVolumeClaim:
      claimName: {CLAIM}
  resources:
    requests:
      cpu: 100m
      memory: 512Mi
"""

Adapters = dict[str, dict[str, Any]]


def adapter_manifest(names: Iterable[str]) -> str:
    return "".join(
        f"---\napiVersion: lorafleet.io/v1alpha1\nkind: LoraAdapter\nmetadata:\n  name: {name}\n"
        f"spec:\n  pool: {POOL}\n  lora:\n    rank: 4\n    alpha: 8\n    targetModules: [q_proj, v_proj]\n"
        for name in names
    )


@dataclass
class Faulty:
    """The release, its durable pool and a log of the faults injected into it."""

    fleet: Fleet
    kills: list[dict[str, Any]] = field(default_factory=list)
    _killed_at: float = 0.0

    @property
    def ns(self) -> str:
        return self.fleet.namespace

    # ---- reading -------------------------------------------------------------------------------

    def adapters(self) -> Adapters:
        """Every LoraAdapter of the namespace by name, straight from the API server when local."""
        kube = self.fleet.kube
        if kube.plane is not None:
            listing = kube.plane.get(f"{API}/namespaces/{self.ns}/loraadapters")
        else:
            listing = kube.get("loraadapters", "-n", self.ns)
        return {a["metadata"]["name"]: a for a in listing["items"]}

    def pods(self) -> dict[str, dict[str, Any]]:
        """The pool's pods that are not going away, by name."""
        items = self.fleet.kube.get("pods", "-n", self.ns, "-l", f"lorafleet.io/pool={POOL}")["items"]
        return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}

    def ready_pods(self) -> dict[str, dict[str, Any]]:
        return {
            name: pod
            for name, pod in self.pods().items()
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in pod.get("status", {}).get("conditions", [])
            )
        }

    def operator_restarts(self) -> int:
        statuses = self.fleet.operator().get("status", {}).get("containerStatuses") or [{}]
        return int(statuses[0].get("restartCount") or 0)

    # ---- acting --------------------------------------------------------------------------------

    def apply(self, names: Iterable[str]) -> None:
        self.fleet.kube.apply(adapter_manifest(names), namespace=self.ns)

    def delete(self, names: Iterable[str]) -> None:
        self.fleet.kube.kubectl(
            "delete", "loraadapter", *names, "-n", self.ns, "--wait=false", "--ignore-not-found"
        )

    def train(self, name: str) -> dict[str, Any]:
        code, step = self.fleet.call("POST", self.fleet.adapter_url(name) + "/distill", feedback_for(name))
        assert code == 200, (name, code, step)
        return dict(step)

    def kill_operator_when(
        self, stage: str, names: list[str], predicate: Callable[[Adapters], bool], timeout: float = 180
    ) -> Adapters:
        """Poll the adapters; the moment ``predicate`` holds, kill -9 the operator. Returns the
        adapters as they were at the kill and logs the kill under ``stage``, with where the
        adapters ``names`` stood at that moment."""
        # Looked up first: between the poll that sees the moment and the kill there is no API call.
        pod = self.fleet.operator()["metadata"]["name"]
        start = time.monotonic()
        while True:
            seen = self.adapters()
            if predicate(seen):
                break
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{stage}: the moment to kill the operator never came: {seen}")
            time.sleep(0.05)
        faults.crash_container(self.fleet.kube, self.ns, pod)
        self.kills.append(
            {"stage": stage, "after_s": round(time.monotonic() - start, 2), **summary(seen, names)}
        )
        self._killed_at = time.monotonic()
        return seen

    def settled(self) -> None:
        """Note on the last kill how long after it the work it interrupted was done."""
        self.kills[-1]["settled_s"] = round(time.monotonic() - self._killed_at, 1)

    # ---- waiting and checking ------------------------------------------------------------------

    def wait_ready(
        self, names: Iterable[str], timeout: float = 300, beyond: dict[str, int] | None = None
    ) -> Adapters:
        """Wait until every adapter named is Ready, those in ``beyond`` at an epoch above the one
        given (they had to move: their old Ready status says nothing about the new placement)."""
        wanted = set(names)
        beyond = beyond or {}

        def all_ready() -> Adapters | None:
            seen = self.adapters()
            for n in wanted:
                adapter = seen.get(n, {})
                if not ready(adapter) or int(adapter["status"].get("epoch") or 0) <= beyond.get(n, 0):
                    return None
            return seen

        found: Adapters = eventually(
            f"{sorted(wanted)} to be Ready", all_ready, timeout=timeout, interval=0.5
        )
        return found

    def wait_gone(self, names: Iterable[str], timeout: float = 180) -> None:
        wanted = set(names)
        eventually(f"{sorted(wanted)} to be gone", lambda: not wanted & set(self.adapters()), timeout=timeout)

    def assert_placed_once(self, seen: Adapters, epochs: dict[str, int]) -> None:
        """Each adapter sits Ready on a live pod (the very pod, by UID) and holds the expected
        epoch on the object and on the trainer: one more placement would have raised it."""
        pods = self.ready_pods()
        for name, epoch in epochs.items():
            status = seen[name]["status"]
            assert status["phase"] == "Ready", (name, status)
            assert status["epoch"] == epoch, f"{name} has epoch {status['epoch']}, expected {epoch}"
            pod = pods.get(status["pod"])
            assert pod is not None, f"{name} is on {status['pod']}, which is not a Ready pod of {POOL}"
            assert pod["metadata"]["uid"] == status["podUID"], f"{name} names an earlier {status['pod']}"
            code, state = self.fleet.call("GET", self.fleet.adapter_url(name, status))
            assert code == 200 and state["epoch"] == epoch, (name, code, state)
            finalizers = seen[name]["metadata"].get("finalizers") or []
            assert finalizers == ["lorafleet.io/finalizer"], (name, finalizers)

    def assert_evicted(self, names: Iterable[str]) -> None:
        """No pod of the pool holds a cache entry of these adapters."""
        entries = {f"{self.ns}/{n}" for n in names}
        for pod in self.pods():
            left = entries & self.fleet.cached(pod)
            assert not left, f"{pod} still caches {sorted(left)}"


def placed(adapter: dict[str, Any]) -> bool:
    return bool((adapter.get("status") or {}).get("pod"))


def ready(adapter: dict[str, Any]) -> bool:
    return (adapter.get("status") or {}).get("phase") == "Ready"


def count(seen: Adapters, names: Iterable[str], test: Callable[[dict[str, Any]], bool]) -> int:
    """How many of the adapters ``names`` exist in ``seen`` and pass ``test``."""
    return sum(1 for n in names if n in seen and test(seen[n]))


def summary(seen: Adapters, names: list[str]) -> dict[str, int]:
    """Where the adapters ``names`` stand: how many exist, are placed, Ready, being deleted."""
    return {
        "of": len(names),
        "exist": count(seen, names, lambda _: True),
        "placed": count(seen, names, placed),
        "ready": count(seen, names, ready),
        "deleting": count(seen, names, lambda a: bool(a["metadata"].get("deletionTimestamp"))),
    }
