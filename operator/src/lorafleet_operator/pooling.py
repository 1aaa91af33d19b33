"""Reconcile a TrainerPool: its pods ``<pool>-<ordinal>``, its headless Service and its status.

Idempotent by construction: it compares the pods that exist with the ordinals the spec asks for,
creates the missing ones (a name conflict means someone already did), deletes failed pods and those
above ``replicas`` (scale-down removes the highest ordinals), and patches status only on a change.
"""

from __future__ import annotations

from typing import Any

from lorafleet_api import pools
from lorafleet_operator import building, failures, names, placing, publishing, statuses, trainers
from lorafleet_operator.runtime import Runtime, announce


async def sync_pool(rt: Runtime, namespace: str, name: str, *, ensure_service: bool = True) -> None:
    """Create missing pods, delete failed and surplus ones, then write the status.

    ``ensure_service`` also (re)creates the headless Service; pod events skip it, the periodic
    resync does it."""
    body = await rt.kube.get_pool(namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return  # owner references let Kubernetes remove the pods and the Service
    pool = pools.parse(body)
    replicas = pool.spec.replicas
    views = [placing.view_pod(p, name) for p in await rt.kube.list_pool_pods(namespace, name)]
    present = set()
    for view in views:
        if view.ordinal is None or view.terminating:
            continue
        if view.ordinal >= replicas:
            await rt.kube.delete_pod(namespace, view.name)
            announce(body, "ScaledDown", f"Deleted pod {view.name} (replicas={replicas})")
        elif view.failed:
            await rt.kube.delete_pod(namespace, view.name)
            announce(
                body,
                "PodFailed",
                warning=True,
                message=f"Deleted failed pod {view.name}; it will be recreated",
            )
        else:
            present.add(view.ordinal)
    for ordinal in range(replicas):
        if ordinal in present or any(v.ordinal == ordinal for v in views):
            continue  # a terminating pod of this name must go before its successor can be created
        if await rt.kube.create_pod(building.build_pod(pool, ordinal, rt.settings)):
            announce(body, "PodCreated", f"Created pod {names.pod_name(name, ordinal)}")
    if ensure_service:
        await rt.kube.create_service(building.build_service(pool, rt.settings))
    await _write_status(rt, body, views, replicas)
    await publishing.sync_serving(rt, pool, views)


async def _write_status(
    rt: Runtime, body: dict[str, Any], views: list[placing.PodView], replicas: int
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    counts: dict[str, int] = {}
    for adapter in await rt.kube.list_pool_adapters(namespace, name):
        pod = (adapter.get("status") or {}).get("pod")
        if pod:
            counts[pod] = counts.get(pod, 0) + 1
    previous = body.get("status") or {}
    cache_bytes = {p["name"]: int(p.get("cacheBytes") or 0) for p in previous.get("pods") or []}
    for view in views:
        if view.ready and view.ip:
            try:
                report = await rt.trainers.cache(trainers.endpoint(view.ip, rt.settings.trainer_port))
                cache_bytes[view.name] = report.used_bytes
            except trainers.TrainerError as exc:
                # The status keeps the last figure; the next sync asks again.
                failures.skipped(rt.metrics, "pool_cache_report", f"pod {namespace}/{view.name}", exc)
    live = [v for v in views if not v.terminating]
    status = statuses.compute_pool_status(
        replicas=replicas,
        pods=live,
        adapter_counts=counts,
        cache_bytes=cache_bytes,
        generation=body["metadata"].get("generation"),
        previous=previous,
        now=rt.clock(),
    )
    if statuses.differs(previous, status):
        await rt.kube.patch_pool_status(namespace, name, status)
