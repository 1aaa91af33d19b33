"""LoraFleet's trainer pods as containers on a real kubelet (`make test-node`): the image runs as its
user on a read-only root, the kubelet applies the limits the operator set, and a pod over its memory
limit is OOM-killed and started again. tests/e2e runs the user's scenario on the same node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from lorafleet_local import images
from lorafleet_local.fleet import Fleet
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.node]

NS = "lorafleet-node"
# Read inside a trainer container: who it runs as, its cgroup limits, where it can write.
INSIDE = """
import json, os
def read(path):
    try:
        return open(path).read().strip()
    except OSError as exc:
        return str(exc)
def writable(path):
    try:
        open(os.path.join(path, ".probe"), "w").close()
        return True
    except OSError:
        return False
print(json.dumps({
    "uid": os.getuid(),
    "memory_limit": read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    "cpu_period": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    "writable": {
        p: writable(p) for p in ("/", "/opt/lorafleet", "/var/lib/lorafleet", "/var/cache/lorafleet")
    },
}))
"""


def pool(name: str, resources: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "lorafleet.io/v1alpha1",
            "kind": "TrainerPool",
            "metadata": {"name": name},
            "spec": {
                "baseModel": "builtin:tiny",
                "replicas": 1,
                "gpu": False,
                "cache": {"capacity": "256Mi"},
                "storage": {"ephemeral": True},  # these tests are about the pod, not the weights
                "resources": resources,
            },
        }
    )


@pytest.fixture(scope="module")
def fleet(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    assert kube.node is not None, "make test-node runs these on a real node"
    fleet = Fleet.install(kube, NS, tmp_path_factory.mktemp("node-fleet"))
    try:
        yield fleet
    finally:
        fleet.uninstall()


def pool_pods(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    return list(fleet.kube.get("pods", "-n", NS, "-l", f"lorafleet.io/pool={name}")["items"])


def test_a_trainer_pod_runs_its_image_under_the_limits_the_operator_set(fleet: Fleet) -> None:
    limits = {"cpu": "1500m", "memory": "3Gi"}
    fleet.kube.apply(pool("fits", {"requests": {"cpu": "500m"}, "limits": limits}), namespace=NS)
    fleet.kube.kubectl(
        "wait", "trainerpool/fits", "-n", NS, "--for=jsonpath={.status.readyReplicas}=1", "--timeout=600s",
        timeout=620,
    )  # fmt: skip
    (pod,) = pool_pods(fleet, "fits")
    (container,) = pod["spec"]["containers"]
    (status,) = pod["status"]["containerStatuses"]
    assert status["image"].endswith(images.IMAGES["trainer-cpu"].tag)
    assert status["containerID"].startswith("containerd://") and status["ready"]
    # The kubelet's readiness probe decided Ready: the probe is the operator's.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["memory"] == "3Gi"
    seen = json.loads(
        fleet.kube.kubectl("exec", "-n", NS, pod["metadata"]["name"], "--", "python", "-c", INSIDE).stdout
    )
    assert seen["uid"] == 10001
    assert int(seen["memory_limit"]) == 3 * 2**30
    assert int(seen["cpu_quota"]) / int(seen["cpu_period"]) == 1.5
    # readOnlyRootFilesystem: only the two volumes take writes.
    assert seen["writable"] == {
        "/": False,
        "/opt/lorafleet": False,
        "/var/lib/lorafleet": True,
        "/var/cache/lorafleet": True,
    }
    fleet.kube.kubectl("delete", "trainerpool", "fits", "-n", NS)


def test_a_pod_over_its_memory_limit_is_oom_killed_and_started_again(fleet: Fleet) -> None:
    # Far below what the trainer needs to import torch and load a model.
    tight = {"memory": "160Mi"}
    fleet.kube.apply(pool("tight", {"requests": {"cpu": "500m", **tight}, "limits": tight}), namespace=NS)

    def oom_killed_twice() -> dict[str, Any] | None:
        for pod in pool_pods(fleet, "tight"):
            for status in pod.get("status", {}).get("containerStatuses", []):
                last = status.get("lastState", {}).get("terminated", {})
                if last.get("reason") == "OOMKilled" and status["restartCount"] >= 2:
                    return dict(status)
        return None

    status = eventually(
        "the tight pool's trainer to be OOM-killed twice", oom_killed_twice, timeout=300, interval=1
    )
    assert status["lastState"]["terminated"]["exitCode"] == 137
    assert not status["ready"]
    pool_status = fleet.kube.get("trainerpool", "tight", "-n", NS).get("status", {})
    assert pool_status.get("readyReplicas", 0) == 0, pool_status
    fleet.kube.kubectl("delete", "trainerpool", "tight", "-n", NS)
