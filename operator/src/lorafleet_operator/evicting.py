"""Deletion of a LoraAdapter: evict its cache entry on the pod that holds it, then let it go.

The finalizer waits for ``DELETE .../cache`` (or, when the adapter's ``deletionPolicy`` or the
operator setting says so, ``DELETE`` of the stored adapter). When the holding pod is gone, its
cache went with it and the finalizer is released at once; when the trainer keeps failing, the
finalizer is released after the eviction timeout. Either way an Event says why, and deleting a
namespace never hangs on a dead pod.
"""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import ValidationError

from lorafleet_api import adapters
from lorafleet_operator import failures, placing, trainers
from lorafleet_operator.kube import ApiError
from lorafleet_operator.runtime import Retry, Runtime, announce


async def release(rt: Runtime, body: dict[str, Any], elapsed: datetime.timedelta) -> None:
    """Evict the adapter; raises Retry while the trainer fails and the timeout has not passed."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status = body.get("status") or {}
    if meta.get("uid") and meta["uid"] in rt.released:
        return
    served_name: str | None = None
    try:
        spec = adapters.parse_spec(body)
        delete_weights = spec.deletion_policy == "Delete" or rt.settings.delete_stored_weights
        pool, served_name = spec.pool, spec.served_name(name)
    except ValidationError:
        delete_weights, pool = rt.settings.delete_stored_weights, (body.get("spec") or {}).get("pool", "")
    rt.metrics.set_phase(namespace, name, "Terminating")
    if status.get("phase") != "Terminating":
        # Cosmetic: the eviction below is what matters, so a failed status write does not stop it.
        try:
            await rt.kube.patch_adapter_status(namespace, name, {"phase": "Terminating"})
        except ApiError as exc:
            failures.skipped(rt.metrics, "adapter_terminating", f"loraadapter {namespace}/{name}", exc)
    target = await _target(rt, namespace, status, pool, delete_weights)
    if target is None and status.get("pod") and served_name is not None:
        await _unload_orphan(rt, body, pool, served_name)
    if target is None:
        if status.get("pod"):
            kept = " (no Ready pod to delete the stored weights; they are kept)" if delete_weights else ""
            announce(body, "CacheGone", f"Pod {status['pod']} is gone; its cache went with it{kept}")
        rt.metrics.evictions.labels(outcome="pod_gone").inc()
        _done(rt, meta)
        return
    try:
        # First off the inference servers, so no server keeps answering with a deleted adapter.
        _say_stuck(body, await rt.trainers.unpublish(target, namespace, name))
        if delete_weights:
            await rt.trainers.delete(target, namespace, name)
            outcome, message = "deleted", "Deleted the stored adapter and its cache entry"
        else:
            evicted = await rt.trainers.evict(target, namespace, name)
            outcome = "evicted" if evicted else "absent"
            message = (
                f"Evicted the cache entry on {status.get('pod')}" if evicted else "No cache entry to evict"
            )
    except trainers.TrainerError as exc:
        timeout = rt.settings.eviction_timeout_seconds
        if elapsed.total_seconds() >= timeout:
            announce(
                body,
                "EvictionTimedOut",
                warning=True,
                message=f"Released after {timeout:g}s without a successful eviction: {exc}",
            )
            rt.metrics.evictions.labels(outcome="timeout").inc()
            _done(rt, meta)
            return
        remaining = timeout - elapsed.total_seconds()
        delay = max(0.1, min(rt.settings.pending_backoff_seconds, remaining))
        raise Retry(f"eviction failed: {exc}", delay=delay) from exc
    announce(body, "Evicted", message)
    rt.metrics.evictions.labels(outcome=outcome).inc()
    _done(rt, meta)


async def _unload_orphan(rt: Runtime, body: dict[str, Any], pool: str, served_name: str) -> None:
    """The pod that published the adapter is gone: another Ready pod of the pool (it knows the same
    servers) unloads the served name wherever it was loaded from this adapter's files, so no server
    keeps answering with a deleted adapter. Best effort: a failure is said in a Warning Event."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    views = [placing.view_pod(p, pool) for p in await rt.kube.list_pool_pods(namespace, pool)]
    others = [(v.name, v.ip) for v in views if v.ready and v.ip and not v.terminating]
    if not others:
        return  # no pod knows the servers; a pool without pods has nobody to publish either
    pod, ip = others[0]
    try:
        unloads = await rt.trainers.unpublish(
            trainers.endpoint(ip, rt.settings.trainer_port), namespace, name, served_name
        )
    except trainers.TrainerError as exc:
        announce(
            body, "UnpublishFailed", warning=True, message=f"Could not unload it from the servers: {exc}"
        )
        return
    if not _say_stuck(body, unloads):
        unloaded = ", ".join(sorted(s for s, why in unloads.items() if why == "unloaded"))
        if unloaded:
            announce(body, "Unpublished", f"Unloaded from {unloaded} through pod {pod}")


def _say_stuck(body: dict[str, Any], unloads: dict[str, str]) -> bool:
    """A Warning Event naming the servers an unpublish left the adapter loaded on; True if any."""
    stuck = {server: why for server, why in unloads.items() if why not in ("unloaded", "absent")}
    if stuck:
        listed = "; ".join(f"{server}: {why}" for server, why in sorted(stuck.items()))
        announce(body, "UnpublishFailed", warning=True, message=f"Still loaded on {listed}")
    return bool(stuck)


def _done(rt: Runtime, meta: dict[str, Any]) -> None:
    rt.metrics.set_phase(meta["namespace"], meta["name"], None)
    if meta.get("uid"):
        rt.released.add(meta["uid"])


async def _target(
    rt: Runtime, namespace: str, status: dict[str, Any], pool: str, delete_weights: bool
) -> str | None:
    """The trainer to call: the holding pod while it is the same pod; for deleting stored weights
    any Ready pod of the pool will do (they share the adapter store)."""
    held = status.get("pod")
    if held:
        pod = await rt.kube.get_pod(namespace, held)
        if pod is not None:
            view = placing.view_pod(pod, pool)
            same = not status.get("podUID") or not view.uid or view.uid == status["podUID"]
            # A terminating pod takes its cache with it; calling it would only delay namespace deletion.
            if same and view.ip and not view.failed and not view.terminating:
                return trainers.endpoint(view.ip, rt.settings.trainer_port)
    if delete_weights and pool:
        for pod in await rt.kube.list_pool_pods(namespace, pool):
            view = placing.view_pod(pod, pool)
            if view.ready and view.ip:
                return trainers.endpoint(view.ip, rt.settings.trainer_port)
    return None
