"""TrainerPool handlers against kmock: pods, the headless Service, replacement and scaling."""

from __future__ import annotations

from typing import Any

import kmock
from tests.operator.harness import (
    PODS,
    POOLS,
    SERVICES,
    create,
    delete,
    eventually,
    live,
    patch,
    pool_manifest,
)

from lorafleet_operator.runtime import Runtime


async def test_three_replicas_make_three_pods_and_a_headless_service(
    cluster: kmock.KubernetesEmulator, operator: Runtime
) -> None:
    store = {"persistentVolumeClaim": {"claimName": "store"}}
    manifest = pool_manifest("qwen", replicas=3, gpu=True, authSecretRef={"name": "auth"}, storage=store)
    await create(cluster, POOLS, manifest)
    pods = await eventually(lambda: (p := live(cluster, PODS)) and len(p) == 3 and p, what="3 pods")
    assert sorted(pods) == ["qwen-0", "qwen-1", "qwen-2"]
    container: dict[str, Any] = pods["qwen-1"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pods["qwen-1"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "auth"
    assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == "store"
    assert pods["qwen-1"]["metadata"]["ownerReferences"][0]["uid"] == "uid-qwen"
    service = await eventually(lambda: live(cluster, SERVICES).get("qwen"), what="service")
    assert service["spec"]["clusterIP"] == "None"
    status = await eventually(
        lambda: (
            (live(cluster, POOLS)["qwen"].get("status") or {}).get("readyReplicas") == 3
            and live(cluster, POOLS)["qwen"]["status"]
        ),
        what="3 ready replicas in status",
    )
    assert [p["name"] for p in status["pods"]] == ["qwen-0", "qwen-1", "qwen-2"]
    assert all(p["ready"] and p["adapters"] == 0 for p in status["pods"])

    # A deleted pod comes back (a new pod: the kubelet gives it a new uid).
    old_uid = pods["qwen-1"]["metadata"].get("uid")
    await delete(cluster, PODS, "qwen-1")
    back = await eventually(
        lambda: (
            (p := live(cluster, PODS).get("qwen-1")) and p["metadata"].get("uid") not in (None, old_uid) and p
        ),
        what="qwen-1 recreated",
    )
    assert back["spec"]["containers"][0]["image"] == operator.settings.trainer_image
    assert len(live(cluster, PODS)) == 3


async def test_scale_up_and_down(cluster: kmock.KubernetesEmulator, operator: Runtime) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=2))
    await eventually(lambda: len(live(cluster, PODS)) == 2, what="2 pods")
    await patch(cluster, POOLS, "demo", {"spec": {"replicas": 4}, "metadata": {"generation": 2}})
    await eventually(
        lambda: sorted(live(cluster, PODS)) == ["demo-0", "demo-1", "demo-2", "demo-3"], what="4 pods"
    )
    await patch(cluster, POOLS, "demo", {"spec": {"replicas": 1}, "metadata": {"generation": 3}})
    await eventually(lambda: sorted(live(cluster, PODS)) == ["demo-0"], what="highest ordinals removed")
    status = await eventually(
        lambda: (
            (s := live(cluster, POOLS)["demo"].get("status") or {}).get("observedGeneration") == 3
            and s["replicas"] == 1
            and s
        ),
        what="status after scale-down",
    )
    assert status["readyReplicas"] == 1


async def test_failed_pod_is_replaced(
    cluster: kmock.KubernetesEmulator, operator: Runtime, kubelet: Any
) -> None:
    await create(cluster, POOLS, pool_manifest("demo", replicas=1))
    first = await eventually(
        lambda: (p := live(cluster, PODS).get("demo-0")) and p["metadata"].get("uid"), what="pod"
    )
    await kubelet.patch("team-a", "demo-0", {"status": {"phase": "Failed"}})
    await eventually(
        lambda: (p := live(cluster, PODS).get("demo-0")) and p["metadata"].get("uid") not in (None, first),
        what="failed pod replaced",
    )
