"""Reconcile a LoraAdapter: place it on a trainer pod, initialise it there, keep its status true.

The adapter's status is the record of its placement. A placement is written (phase Placed, pod,
epoch) before the trainer's init is called, so an operator that restarts at any point finds the
placement and re-sends the same init (the trainer answers 200 for the same config) instead of
placing the adapter a second time. Only placement takes the pool's lock (and decides again under
it), and so does initialisation; keeping a Ready adapter's status fresh runs unlocked.
"""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import ValidationError

from lorafleet_operator import adapters, placing, pools, statuses, trainers
from lorafleet_operator.placing import Move
from lorafleet_operator.runtime import Retry, Runtime, announce


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
            await _write(rt, body, {"phase": "Failed"}, ("Placed", False, "InvalidSpec", str(exc)))
            return
        if await _settle(rt, body, spec, refresh, may_place=False):
            return
        async with rt.pool_lock(namespace, spec.pool):
            fresh = await rt.kube.get_adapter(namespace, name)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            await _settle(rt, fresh, spec, refresh, may_place=True)


async def _settle(
    rt: Runtime, body: dict[str, Any], spec: adapters.AdapterSpec, refresh: bool, *, may_place: bool
) -> bool:
    """Act on the adapter's placement; False when it needs (re)placement and ``may_place`` is off."""
    namespace = body["metadata"]["namespace"]
    status = body.get("status") or {}
    views = (placing.view_pod(p, spec.pool) for p in await rt.kube.list_pool_pods(namespace, spec.pool))
    pods = {v.name: v for v in views}
    current = pods.get(status.get("pod") or "")
    grace = datetime.timedelta(seconds=rt.settings.replace_grace_seconds)
    move, reason = placing.decide(
        status, current, now=rt.clock(), grace=grace, unready_since=rt.unready_since(current)
    )
    if move is Move.WAIT:
        await _write(rt, body, {}, ("Ready", False, "PodNotReady", reason))
        return True
    if move is Move.KEEP and current is not None:
        generation = body["metadata"].get("generation")
        if status.get("phase") != "Ready" or status.get("observedGeneration") != generation:
            if not may_place:
                return False  # a placement may be initialising it right now: decide under the lock
            await _initialize(rt, body, spec, status)
        elif refresh:
            await _refresh(rt, body, spec, status)
        return True
    if not may_place:
        return False
    pool_body = await rt.kube.get_pool(namespace, spec.pool)
    if pool_body is None:
        await _pending(rt, body, "PoolNotFound", f"TrainerPool {spec.pool} does not exist")
    assert pool_body is not None
    await _place(rt, body, spec, pools.parse(pool_body), pool_body, pods, move, reason)
    return True


async def _place(
    rt: Runtime,
    body: dict[str, Any],
    spec: adapters.AdapterSpec,
    pool: pools.Pool,
    pool_body: dict[str, Any],
    pods: dict[str, placing.PodView],
    move: Move,
    reason: str,
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    status = body.get("status") or {}
    others = [
        (a.get("status") or {}).get("pod")
        for a in await rt.kube.list_pool_adapters(namespace, spec.pool)
        if a["metadata"]["name"] != name
    ]
    cache = {
        p["name"]: int(p.get("cacheBytes") or 0) for p in (pool_body.get("status") or {}).get("pods") or []
    }
    candidates = placing.loads(pods.values(), others, cache, pool.spec.replicas)
    choice = placing.choose_pod(candidates, pool.spec.max_adapters_per_pod)
    if choice is None:
        if candidates:
            await _pending(
                rt,
                body,
                "PoolFull",
                f"every Ready pod of {spec.pool} holds {pool.spec.max_adapters_per_pod} adapters",
            )
        await _pending(rt, body, "NoReadyPod", f"TrainerPool {spec.pool} has no Ready pod")
    assert choice is not None
    target = pods[choice.name]
    epoch = int(status.get("epoch") or 0) + 1
    placed = {
        "phase": "Placed",
        "pod": target.name,
        "podUID": target.uid,
        "endpoint": trainers.endpoint(target.ip or "", rt.settings.trainer_port),
        "epoch": epoch,
        "cached": False,
    }
    status = await _write(
        rt, body, placed, ("Placed", True, "Placed", f"on pod {target.name}, epoch {epoch}")
    )
    rt.metrics.placements.inc()
    if move is Move.REPLACE:
        rt.metrics.reschedules.inc()
        announce(
            body,
            "Rescheduled",
            warning=True,
            message=f"Moved to pod {target.name} with epoch {epoch}: {reason}",
        )
    else:
        announce(body, "Placed", f"Placed on pod {target.name} with epoch {epoch}")
    await _initialize(rt, body, spec, status)


async def _initialize(
    rt: Runtime,
    body: dict[str, Any],
    spec: adapters.AdapterSpec,
    status: dict[str, Any],
    *,
    may_advance: bool = True,
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    request = adapters.init_request(spec, int(status.get("epoch") or 1))
    try:
        code = await rt.trainers.init(status["endpoint"], namespace, name, request)
    except trainers.TrainerError as exc:
        if exc.status == 409 and exc.field == "epoch" and may_advance:
            advanced = await _advance_epoch(rt, body, status)
            if advanced is not None:
                await _initialize(rt, body, spec, advanced, may_advance=False)
                return
        if exc.status in (409, 422):
            # The trainer refuses this config (e.g. stored weights of another shape): retrying cannot help.
            await _write(rt, body, {"phase": "Failed"}, ("Initialized", False, "InitRejected", str(exc)))
            announce(body, "InitRejected", warning=True, message=str(exc))
            return
        await _write(rt, body, {}, ("Initialized", False, "TrainerUnavailable", exc.message))
        raise Retry(f"init on {status['pod']} failed: {exc}") from exc
    done = "Created" if code == 201 else "Unchanged"
    await _write(
        rt,
        body,
        {"phase": "Ready", "observedGeneration": body["metadata"].get("generation")},
        ("Initialized", True, done, f"trainer answered {code} for epoch {request['epoch']}"),
        ("Ready", True, "Initialized", f"ready on pod {status['pod']}"),
    )


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
        return None
    stored = int((state or {}).get("epoch") or 0)
    if stored < int(status.get("epoch") or 1):
        return None
    epoch = stored + 1
    message = f"the stored adapter was at epoch {stored}; taken over with epoch {epoch}"
    advanced = await _write(rt, body, {"epoch": epoch}, ("Placed", True, "EpochAdvanced", message))
    announce(body, "EpochAdvanced", f"Resumed the retained adapter on pod {status['pod']}: {message}")
    return advanced


async def _refresh(
    rt: Runtime, body: dict[str, Any], spec: adapters.AdapterSpec, status: dict[str, Any]
) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        state = await rt.trainers.state(status["endpoint"], namespace, name)
    except trainers.TrainerError:
        return  # the next resync tries again; placement is judged by the pod, not by this poll
    if state is None:
        # The trainer restarted in place and lost the adapter: initialise it again (same epoch).
        await _initialize(rt, body, spec, status)
        return
    update: dict[str, Any] = {"version": state.get("version"), "cached": bool(state.get("cached"))}
    if state.get("version") != status.get("version") and status.get("version") is not None:
        update["lastStepTime"] = statuses.timestamp(rt.clock())
    await _write(rt, body, update)


async def _pending(rt: Runtime, body: dict[str, Any], reason: str, message: str) -> None:
    await _write(
        rt, body, {"phase": "Pending"}, ("Placed", False, reason, message), ("Ready", False, reason, message)
    )
    raise Retry(f"{reason}: {message}")


async def _write(
    rt: Runtime, body: dict[str, Any], fields: dict[str, Any], *conditions: tuple[str, bool, str, str]
) -> dict[str, Any]:
    """Patch the adapter's status with ``fields`` and ``conditions``; returns the status as now stored."""
    meta = body["metadata"]
    stored = dict(body.get("status") or {})
    desired = dict(fields)
    merged = stored.get("conditions") or []
    for type_, ok, reason, message in conditions:
        merged = statuses.set_condition(
            merged, type_, ok, reason, message, now=rt.clock(), generation=meta.get("generation")
        )
    if conditions:
        desired["conditions"] = merged
    if statuses.differs(stored, desired):
        await rt.kube.patch_adapter_status(meta["namespace"], meta["name"], desired)
    stored.update(desired)
    body["status"] = stored
    rt.metrics.set_phase(meta["namespace"], meta["name"], stored.get("phase"))
    return stored
