"""Status computation: pure functions from what was observed to the status a resource should have.

Handlers compute the desired status, compare it with the stored one and patch only on a change
(conditions keep their ``lastTransitionTime`` while their status stays the same), so a periodic
re-check of an unchanged world writes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from lorafleet_operator.placing import PodView


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def timestamp(now: datetime.datetime) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Condition:
    """A condition to set on a status: its type, whether it holds, a CamelCase reason, a message."""

    type: str
    status: bool
    reason: str
    message: str


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime.datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; its transition time moves only when its status flips."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    previous: Mapping[str, Any] | None = None
    for condition in conditions:
        if condition.get("type") == type_:
            previous = condition
        else:
            result.append(dict(condition))
    changed_at = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == value and previous.get("lastTransitionTime")
        else timestamp(now)
    )
    new: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": changed_at,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    result.append(new)
    return sorted(result, key=lambda c: str(c.get("type")))


def set_conditions(
    conditions: Iterable[Mapping[str, Any]],
    new: Iterable[Condition],
    *,
    now: datetime.datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """``conditions`` with each of ``new`` set in turn (see ``set_condition``)."""
    result = [dict(c) for c in conditions]
    for c in new:
        result = set_condition(result, c.type, c.status, c.reason, c.message, now=now, generation=generation)
    return result


def compute_pool_status(
    *,
    replicas: int,
    pods: Iterable[PodView],
    adapter_counts: Mapping[str, int],
    cache_bytes: Mapping[str, int],
    generation: int | None,
    previous: Mapping[str, Any],
    now: datetime.datetime,
) -> dict[str, Any]:
    """The TrainerPool status for the pods that exist now (sorted by ordinal)."""
    owned = sorted(
        (p for p in pods if p.ordinal is not None), key=lambda p: p.ordinal if p.ordinal is not None else -1
    )
    ready = sum(1 for p in owned if p.ready)
    all_ready = ready >= replicas and len(owned) == replicas
    reason = "AllPodsReady" if all_ready else "PodsNotReady"
    message = f"{ready}/{replicas} trainer pods are Ready"
    return {
        "replicas": len(owned),
        "readyReplicas": ready,
        "pods": [
            {
                "name": p.name,
                "ready": p.ready,
                "adapters": adapter_counts.get(p.name, 0),
                "cacheBytes": cache_bytes.get(p.name, 0),
            }
            for p in owned
        ],
        "conditions": set_condition(
            previous.get("conditions") or [],
            "Ready",
            all_ready,
            reason,
            message,
            now=now,
            generation=generation,
        ),
        "observedGeneration": generation,
    }


def differs(stored: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether patching ``desired`` onto ``stored`` would change anything."""
    stored = stored or {}
    return any(stored.get(key) != value for key, value in desired.items())
