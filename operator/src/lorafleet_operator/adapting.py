"""Reconcile a LoraAdapter: place it on a trainer pod, initialise it there, keep its status true.

The adapter's status is the record of its placement. A placement is written (phase Placed, pod,
epoch) before the trainer's init is called, so an operator that restarts at any point finds the
placement and re-sends the same init (the trainer answers 200 for the same config) instead of
placing the adapter a second time. Only placement takes the pool's lock (and decides again under
it), and so does initialisation; keeping a Ready adapter's status fresh runs unlocked.

What to do is planned by pure functions (``plans``); what happened is named as an outcome, whose
status and Event are computed by pure functions too (``outcomes``). This module does the I/O.
"""

from __future__ import annotations

import datetime
from typing import Any, NoReturn

from pydantic import ValidationError

from lorafleet_api import adapters, pools, wire
from lorafleet_operator import failures, outcomes, plans, publishing, statuses, trainers
from lorafleet_operator.placing import Move, PodView, view_pod
from lorafleet_operator.plans import Step
from lorafleet_operator.runtime import Retry, Runtime, Waiting, announce


async def reconcile(
    rt: Runtime, namespace: str, name: str, *, refresh: bool = False, body: dict[str, Any] | None = None
) -> None:
    """Bring one adapter's placement and status up to date; ``refresh`` also polls its trainer state.

    ``body`` (the object as the caller just saw it) saves a read for the unlocked first pass; the
    locked pass always reads the object again."""
    with rt.metrics.reconcile_duration.time():
        if body is None:
            body = await rt.kube.get_adapter(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = adapters.parse_spec(body)
        except ValidationError as exc:
            await _write(rt, body, outcomes.InvalidSpec(str(exc)))
            return
        if await _settle(rt, body, spec, refresh, locked=False):
            return
        async with rt.pool_lock(namespace, spec.pool):
            fresh = await rt.kube.get_adapter(namespace, name)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            await _settle(rt, fresh, spec, refresh, locked=True)


async def _settle(
    rt: Runtime, body: dict[str, Any], spec: adapters.AdapterSpec, refresh: bool, *, locked: bool
) -> bool:
    """Act on the adapter's plan; False when the plan needs the pool's lock and ``locked`` is off."""
    namespace = body["metadata"]["namespace"]
    status = body.get("status") or {}
    pods = {
        v.name: v
        for v in (view_pod(p, spec.pool) for p in await rt.kube.list_pool_pods(namespace, spec.pool))
    }
    current = pods.get(status.get("pod") or "")
    plan = plans.plan_adapter(
        plans.Observed(
            status=status,
            generation=body["metadata"].get("generation"),
            pod=current,
            now=rt.clock(),
            grace=datetime.timedelta(seconds=rt.settings.replace_grace_seconds),
            unready_since=rt.unready_since(current),
            refresh=refresh,
            locked=locked,
        )
    )
    match plan.step:
        case Step.LOCK:
            return False  # a placement may be initialising it right now: decide under the lock
        case Step.WAIT:
            await _write(rt, body, outcomes.PodNotReady(plan.reason))
        case Step.INITIALIZE:
            await _initialize(rt, body, spec, status)
        case Step.REFRESH:
            await _refresh(rt, body, spec, status)
        case Step.PLACE:
            await _place(rt, body, spec, pods, plan)
    return True


async def _place(
    rt: Runtime, body: dict[str, Any], spec: adapters.AdapterSpec, pods: dict[str, PodView], plan: plans.Plan
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    pool_body = await rt.kube.get_pool(namespace, spec.pool)
    if pool_body is None:
        await _wait(rt, body, plans.pool_missing(spec.pool))
    others = [
        (a.get("status") or {}).get("pod")
        for a in await rt.kube.list_pool_adapters(namespace, spec.pool)
        if a["metadata"]["name"] != name
    ]
    cache = plans.cache_bytes(pool_body.get("status") or {})
    target = plans.choose_target(pools.parse(pool_body), pods, others, cache)
    if isinstance(target, outcomes.Pending):
        await _wait(rt, body, target)
    placed = outcomes.Placed(
        pod=target.name,
        uid=target.uid,
        endpoint=trainers.endpoint(target.ip or "", rt.settings.trainer_port),
        epoch=int((body.get("status") or {}).get("epoch") or 0) + 1,
        moved_because=plan.reason if plan.move is Move.REPLACE else None,
    )
    status = await _write(rt, body, placed)
    rt.metrics.placements.inc()
    if placed.moved_because is not None:
        rt.metrics.reschedules.inc()
    await _initialize(rt, body, spec, status)


async def _wait(rt: Runtime, body: dict[str, Any], pending: outcomes.Pending) -> NoReturn:
    """Show why no pod can take the adapter, then have it tried again later."""
    await _write(rt, body, pending)
    raise Waiting(f"{pending.reason}: {pending.message}")


async def _initialize(
    rt: Runtime,
    body: dict[str, Any],
    spec: adapters.AdapterSpec,
    status: dict[str, Any],
    *,
    may_advance: bool = True,
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    epoch = int(status.get("epoch") or 1)
    # Published under its served name only if no older adapter of the namespace holds it (checked
    # now, not from the last serving sync: a load under a taken name replaces the holder's weights).
    taken = publishing.names_taken(await rt.kube.list_adapters(namespace))
    rt.names_taken[namespace] = taken
    try:
        code = await rt.trainers.init(
            status["endpoint"],
            namespace,
            name,
            wire.init_request(spec, epoch, None if name in taken else name),
        )
    except trainers.TrainerError as exc:
        if exc.status == 409 and exc.field == "epoch" and may_advance:
            advanced = await _advance_epoch(rt, body, status)
            if advanced is not None:
                await _initialize(rt, body, spec, advanced, may_advance=False)
                return
        if exc.status in (409, 422):
            # The trainer refuses this config (e.g. stored weights of another shape): retrying cannot help.
            await _write(rt, body, outcomes.InitRejected(str(exc)))
            return
        await _write(rt, body, outcomes.TrainerUnavailable(status["pod"], exc.message))
        raise Retry(f"init on {status['pod']} failed: {exc}") from exc
    await _write(rt, body, outcomes.initialized(status, status["pod"], epoch, code))


async def _advance_epoch(rt: Runtime, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any] | None:
    """The stored adapter has a newer epoch than this object: it was trained under an earlier
    object of the same name (deleted with ``deletionPolicy: Retain``, then re-created). Take over
    the retained weights by placing again, on the same pod, with the epoch after the stored one;
    the status is written before the init as for any placement. None when the trainer does not
    show a newer stored epoch (then the refusal stands)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        state = await rt.trainers.state(status["endpoint"], namespace, name)
    except trainers.TrainerError:
        return None  # the refusal stands, and the status and a Warning Event say so
    stored = state.epoch if state is not None else 0
    if stored < int(status.get("epoch") or 1):
        return None
    return await _write(rt, body, outcomes.EpochAdvanced(status["pod"], stored))


async def _refresh(
    rt: Runtime, body: dict[str, Any], spec: adapters.AdapterSpec, status: dict[str, Any]
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    async with rt.adapter_lock(namespace, name):
        try:
            state = await rt.trainers.state(status["endpoint"], namespace, name)
        except trainers.TrainerError as exc:
            # The next resync polls again; placement is judged by the pod, not by this poll.
            failures.skipped(rt.metrics, "adapter_poll", f"loraadapter {namespace}/{name}", exc)
            return
        if state is not None:
            await _write(rt, body, outcomes.polled(status, status["pod"], state, _taken(rt, spec, body)))
            return
    # The trainer restarted in place and lost the adapter: initialise it again (same epoch).
    await _initialize(rt, body, spec, status)


def _taken(rt: Runtime, spec: adapters.AdapterSpec, body: dict[str, Any]) -> outcomes.NameTaken | None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    holder = rt.names_taken.get(namespace, {}).get(name)
    return outcomes.NameTaken(spec.served_name(name), holder) if holder is not None else None


async def follow(rt: Runtime, pod: str, state: wire.AdapterState) -> None:
    """Trainer pod ``pod`` reports that the adapter's state changed: write it to the status now,
    if the adapter is still Ready on that pod and the report is not older than the status (a
    report that is goes to the resync to judge)."""
    namespace, name = state.namespace, state.name
    async with rt.adapter_lock(namespace, name):
        body = await rt.kube.get_adapter(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        status = body.get("status") or {}
        if status.get("pod") != pod or status.get("phase") != "Ready":
            return
        if state.version < int(status.get("version") or 0):
            return
        try:
            spec = adapters.parse_spec(body)
        except ValidationError:
            return
        await _write(rt, body, outcomes.polled(status, pod, state, _taken(rt, spec, body)))


async def _write(rt: Runtime, body: dict[str, Any], outcome: outcomes.Outcome) -> dict[str, Any]:
    """Patch the adapter's status for ``outcome`` (only on a change) and post its Event; returns
    the status as now stored."""
    meta = body["metadata"]
    stored = dict(body.get("status") or {})
    before = dict(stored)
    desired = outcomes.adapter_status(stored, outcome, now=rt.clock(), generation=meta.get("generation"))
    if statuses.differs(stored, desired):
        await rt.kube.patch_adapter_status(meta["namespace"], meta["name"], desired)
    stored.update(desired)
    body["status"] = stored
    rt.metrics.set_phase(meta["namespace"], meta["name"], stored.get("phase"))
    event = outcomes.announcement(outcome, before)
    if event is not None:
        announce(body, event.reason, event.message, warning=event.warning)
    return stored
