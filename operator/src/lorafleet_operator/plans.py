"""Planning one pass of an adapter's reconcile: pure functions from what was observed to what to do.

``plan_adapter`` turns the stored status, the adapter's current pod and the clock into one ``Step``;
``choose_target`` picks the pod a placement goes to, or says as a ``Pending`` outcome why there is
none. Initialising and placing change what other adapters of the pool see, so they are only
planned under the pool's lock: unlocked, such a plan is ``LOCK`` (decide again under the lock).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from lorafleet_api.pools import Pool
from lorafleet_operator import placing
from lorafleet_operator.outcomes import Pending
from lorafleet_operator.placing import Move, PodView


class Step(enum.Enum):
    WAIT = "wait"  # its pod is not Ready, within the grace period: say so and stay
    INITIALIZE = "initialize"  # on a Ready pod, but not initialised for this generation
    REFRESH = "refresh"  # Ready and current: poll its trainer for version and cache state
    IDLE = "idle"  # Ready and current, and no poll asked for
    PLACE = "place"  # needs a pod: never placed, or its pod is gone or not Ready for too long
    LOCK = "lock"  # would initialise or place: plan again under the pool's lock


@dataclasses.dataclass(frozen=True)
class Observed:
    """What one reconcile pass saw of an adapter."""

    status: Mapping[str, Any]
    generation: int | None
    pod: PodView | None  # the pod its status names, if that pod exists
    now: datetime.datetime
    grace: datetime.timedelta
    unready_since: datetime.datetime | None = None  # when the operator first saw ``pod`` not Ready
    refresh: bool = False  # the periodic resync: poll the trainer
    locked: bool = False  # this pass holds the pool's lock


@dataclasses.dataclass(frozen=True)
class Plan:
    step: Step
    move: Move
    reason: str  # why the placement moves or waits, for Events and conditions


def plan_adapter(observed: Observed) -> Plan:
    """What this pass should do for the adapter."""
    move, reason = placing.decide(
        observed.status,
        observed.pod,
        now=observed.now,
        grace=observed.grace,
        unready_since=observed.unready_since,
    )
    if move is Move.WAIT:
        return Plan(Step.WAIT, move, reason)
    if move is Move.KEEP and observed.pod is not None:
        current = (
            observed.status.get("phase") == "Ready"
            and observed.status.get("observedGeneration") == observed.generation
        )
        if current:
            return Plan(Step.REFRESH if observed.refresh else Step.IDLE, move, reason)
        step = Step.INITIALIZE
    else:
        step = Step.PLACE
    return Plan(step if observed.locked else Step.LOCK, move, reason)


def pool_missing(pool: str) -> Pending:
    return Pending("PoolNotFound", f"TrainerPool {pool} does not exist")


def cache_bytes(pool_status: Mapping[str, Any]) -> dict[str, int]:
    """Each pod's cache use as the pool's status last reported it."""
    return {p["name"]: int(p.get("cacheBytes") or 0) for p in pool_status.get("pods") or []}


def choose_target(
    pool: Pool,
    pods: Mapping[str, PodView],
    placed_on: Iterable[str | None],
    cache: Mapping[str, int],
) -> PodView | Pending:
    """The pod an adapter goes to (``placed_on``: the pods of the pool's other adapters), or why
    none can take it."""
    candidates = placing.loads(pods.values(), placed_on, cache, pool.spec.replicas)
    choice = placing.choose_pod(candidates, pool.spec.max_adapters_per_pod)
    if choice is not None:
        return pods[choice.name]
    if candidates:
        most = pool.spec.max_adapters_per_pod
        return Pending("PoolFull", f"every Ready pod of {pool.name} holds {most} adapters")
    return Pending("NoReadyPod", f"TrainerPool {pool.name} has no Ready pod")
