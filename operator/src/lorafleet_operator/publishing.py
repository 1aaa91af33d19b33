"""Publishing: tell each trainer pod which inference servers to keep serving its adapters on.

A pool's ``spec.serving`` selects server pods (vLLM) in its namespace. Whenever the pool is synced
or one of those pods changes (new, gone, readiness or IP), every Ready trainer pod of the pool gets
``PUT /v1/serving``: the Ready servers' URLs, the adapters placed on that pod with their served
names, and where the servers mount the adapter store. The trainer does the publishing itself,
beside its step path (it knows the moment a version commits); the operator only keeps that view
true and reads back, per adapter, what each server serves (``adapting`` writes it to the status).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lorafleet_api import adapters, pools, wire
from lorafleet_api.selectors import SelectorError, matches, selector_string
from lorafleet_operator import failures, names, placing, trainers
from lorafleet_operator.kube import ApiError, of_pool
from lorafleet_operator.runtime import Runtime

logger = logging.getLogger(__name__)


def servers(pods: Sequence[Mapping[str, Any]], port: int) -> list[wire.ServerRef]:
    """The Ready server pods with an IP, as the trainer API names them."""
    result = []
    for pod in pods:
        view = placing.view_pod(pod, "")
        if view.ready and view.ip:
            result.append(wire.ServerRef(name=view.name, url=trainers.endpoint(view.ip, port)))
    return sorted(result, key=lambda s: s.name)


def _served_name(body: Mapping[str, Any]) -> str | None:
    try:
        return adapters.parse_spec(dict(body)).served_name(body["metadata"]["name"])
    except ValueError:
        return None


def names_taken(adapter_bodies: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """For each adapter of one namespace whose served name an older adapter there already uses:
    that adapter's name. An inference server keeps one adapter per name (a second load under it
    would replace the first's weights, and chats would be answered by the wrong adapter), so only
    the oldest (by creation, then name) is published; the others wait until the name is free."""
    holders: dict[str, str] = {}
    taken: dict[str, str] = {}
    alive = [b for b in adapter_bodies if not b["metadata"].get("deletionTimestamp")]
    for body in sorted(
        alive, key=lambda b: (b["metadata"].get("creationTimestamp") or "", b["metadata"]["name"])
    ):
        served = _served_name(body)
        if served is None:
            continue
        name = body["metadata"]["name"]
        holder = holders.setdefault(served, name)
        if holder != name:
            taken[name] = holder
    return taken


def owned(
    adapter_bodies: Sequence[Mapping[str, Any]], pod: str, taken: Mapping[str, str] | None = None
) -> list[wire.OwnedAdapter]:
    """The adapters placed on ``pod`` with their served names (unparseable specs skipped, and
    those whose served name another adapter holds: ``taken``, from :func:`names_taken`)."""
    result = []
    for body in adapter_bodies:
        meta, status = body["metadata"], body.get("status") or {}
        if status.get("pod") != pod or meta.get("deletionTimestamp") or meta["name"] in (taken or {}):
            continue
        served = _served_name(body)
        if served is None:
            continue
        result.append(wire.OwnedAdapter(namespace=meta["namespace"], name=meta["name"], served_name=served))
    return result


async def sync_serving(
    rt: Runtime, pool: pools.Pool, trainer_pods: Sequence[placing.PodView] | None = None
) -> None:
    """Give every Ready trainer pod of the pool the current servers and its adapters;
    ``trainer_pods``: the pool's pods as the caller just listed them (else they are listed here)."""
    namespace, name, serving = pool.namespace, pool.name, pool.spec.serving
    if serving is None:
        if rt.serving_selectors.pop((namespace, name), None) is None:
            return  # never served: nothing to take back
        found: list[wire.ServerRef] = []
    else:
        try:
            selector = selector_string(serving.selector)
        except SelectorError as exc:
            logger.warning("trainerpool %s/%s: %s", namespace, name, exc)
            return
        rt.serving_selectors[(namespace, name)] = dict(serving.selector)
        listed = await rt.kube.list_pods(namespace, selector)
        # Matched again, as the pool's own pods are: a server that ignores the selector must not
        # make trainers publish to pods the pool does not select.
        chosen = [p for p in listed if matches(serving.selector, p["metadata"].get("labels") or {})]
        found = servers(chosen, serving.port)
    if trainer_pods is None:
        trainer_pods = [placing.view_pod(p, name) for p in await rt.kube.list_pool_pods(namespace, name)]
    everyone = await rt.kube.list_adapters(namespace)
    taken = rt.names_taken[namespace] = names_taken(everyone)
    adapter_bodies = [b for b in everyone if of_pool(b, name)]
    for view in trainer_pods:
        if not view.ready or not view.ip:
            continue
        body = wire.ServingRequest(
            servers=found,
            adapters=owned(adapter_bodies, view.name, taken),
            adapter_root=serving.adapter_root or None if serving is not None else None,
        )
        try:
            await rt.trainers.set_serving(trainers.endpoint(view.ip, rt.settings.trainer_port), body)
        except trainers.TrainerError as exc:
            failures.skipped(rt.metrics, "serving_sync", f"pod {namespace}/{view.name}", exc)


def pools_selecting(rt: Runtime, namespace: str, labels: Mapping[str, str]) -> list[str]:
    """The pools of ``namespace`` whose servers include a pod with these labels."""
    if names.POOL_LABEL in labels:
        return []  # a trainer pod: the pool's own pod handler syncs it
    return [
        pool
        for (ns, pool), selector in rt.serving_selectors.items()
        if ns == namespace and matches(selector, labels)
    ]


async def server_changed(rt: Runtime, namespace: str, pool: str) -> None:
    """A server pod of ``pool`` changed: sync the pool's trainers now; a failure waits for the resync."""
    try:
        body = await rt.kube.get_pool(namespace, pool)
        if body is not None:
            await sync_serving(rt, pools.parse(body))
    except ApiError as exc:
        failures.skipped(rt.metrics, "server_event", f"trainerpool {namespace}/{pool}", exc)


async def name_freed(rt: Runtime, namespace: str, holder: str) -> None:
    """``holder`` is gone: sync the serving of the pools whose adapters waited for its served name."""
    if holder not in rt.names_taken.get(namespace, {}).values():
        return
    try:
        everyone = await rt.kube.list_adapters(namespace)
    except ApiError as exc:
        failures.skipped(rt.metrics, "serving_sync", f"adapters of {namespace}", exc)
        return
    waiting = {a["metadata"]["name"] for a in everyone} & {
        name for name, held_by in rt.names_taken[namespace].items() if held_by == holder
    }
    pools_of_waiting = {
        str((a.get("spec") or {}).get("pool")) for a in everyone if a["metadata"]["name"] in waiting
    }
    for pool in sorted(pools_of_waiting):
        await server_changed(rt, namespace, pool)
