"""Storage loss is never silent: a lost pod of an ephemeral pool shows its adapters' restart.

On the release of the control-plane fault tests, `examples/pool-ephemeral.yaml` (one pod, adapters
on an emptyDir) gets an adapter that trains two steps; then its pod is lost (killed and
force-deleted, as when its node goes). The adapter is placed again on the pool's new pod and is
Ready, and the user sees what happened: its WeightsStored condition is False with reason
StorageLost, `status.version` is 0 and `status.lostVersion` 2, a Warning Event says so, and the
trainer indeed trains it on from version 0. (That the default pool, on a claim, loses nothing is
checked by the e2e scenario's pod loss, on `examples/pool.yaml`.)
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.reliability import faults
from tests.reliability.fleetstate import Faulty

from lorafleet_local.fleet import EXAMPLES
from lorafleet_local.polling import eventually

pytestmark = pytest.mark.e2e

POOL = "scratch"
NAME = "fleeting"
MANIFEST = f"""\
apiVersion: lorafleet.io/v1alpha1
kind: LoraAdapter
metadata:
  name: {NAME}
spec:
  pool: {POOL}
  lora:
    rank: 4
    alpha: 8
    targetModules: [q_proj, v_proj]
"""


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def test_a_lost_pod_of_an_ephemeral_pool_shows_the_restart(faulty: Faulty) -> None:
    kube, fleet = faulty.fleet.kube, faulty.fleet
    kube.apply(EXAMPLES / "pool-ephemeral.yaml", namespace=faulty.ns)
    try:
        kube.kubectl(
            "wait", f"trainerpool/{POOL}", "-n", faulty.ns,
            "--for=jsonpath={.status.readyReplicas}=1", "--timeout=600s", timeout=620,
        )  # fmt: skip
        kube.apply(MANIFEST, namespace=faulty.ns)
        before = faulty.wait_ready([NAME])[NAME]["status"]
        assert _conditions(before)["WeightsStored"]["reason"] == "Created", before
        assert [faulty.train(NAME)["version"] for _ in range(2)] == [1, 2]
        eventually(
            f"{NAME}'s status.version to reach 2",
            lambda: fleet.adapter(NAME)["status"].get("version") == 2,
            timeout=120,
        )

        faults.lose_pod(kube, faulty.ns, before["pod"])
        status = faulty.wait_ready([NAME], timeout=600, beyond={NAME: before["epoch"]})[NAME]["status"]

        assert status["podUID"] != before["podUID"], status
        assert (status["phase"], status["version"], status["lostVersion"]) == ("Ready", 0, 2), status
        weights = _conditions(status)["WeightsStored"]
        assert (weights["status"], weights["reason"]) == ("False", "StorageLost"), weights
        assert "restarted from version 0" in weights["message"] and "version 2 is lost" in weights["message"]
        events = kube.get(
            "events", "-n", faulty.ns, "--field-selector", f"involvedObject.name={NAME},reason=StorageLost"
        )["items"]
        assert [e["type"] for e in events] == ["Warning"], events
        assert "version 2 is lost" in events[0]["message"]
        # The status tells the truth: the trainer has the adapter at version 0 and trains on from there.
        code, state = fleet.call("GET", fleet.adapter_url(NAME, status))
        assert code == 200 and state["version"] == 0, state
        assert faulty.train(NAME)["version"] == 1
    finally:
        faulty.delete([NAME])
        kube.kubectl("delete", "trainerpool", POOL, "-n", faulty.ns, "--ignore-not-found", "--wait=false")
