"""Placement: which trainer pod holds an adapter, and when an adapter must move.

All pure functions. A new adapter goes to the Ready pod with the fewest adapters (ties: least
cache bytes, then lowest ordinal), within ``maxAdaptersPerPod``. A placed adapter is sticky,
because its cache is warm there, until its pod is gone (deleted, replaced by a new pod of the same
name, failed) or has been not-Ready for longer than the grace period; then it is placed again.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from lorafleet_operator import names


@dataclasses.dataclass(frozen=True)
class PodView:
    """What placement needs to know about one trainer pod."""

    name: str
    uid: str | None
    ordinal: int | None
    ip: str | None
    ready: bool
    failed: bool
    terminating: bool
    # When the Ready condition last changed (None when the pod never reported one).
    ready_changed: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class PodLoad:
    """A placement candidate: a Ready pod and what it already holds."""

    name: str
    adapters: int
    cache_bytes: int
    ordinal: int


class Move(enum.Enum):
    KEEP = "keep"  # the pod is Ready: stay
    WAIT = "wait"  # the pod is not Ready, but within the grace period: stay for now
    PLACE = "place"  # never placed (or placement was lost): place
    REPLACE = "replace"  # the pod is gone or not Ready for too long: place again, epoch + 1


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def view_pod(pod: Mapping[str, Any], pool: str) -> PodView:
    """Summarise a Pod body. Ready means the Ready condition is True and the pod has an IP."""
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    ready_condition = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"),
        None,
    )
    ip = status.get("podIP") or None
    failed = status.get("phase") in ("Failed", "Succeeded")
    terminating = bool(meta.get("deletionTimestamp"))
    condition_true = ready_condition is not None and ready_condition.get("status") == "True"
    return PodView(
        name=meta.get("name", ""),
        uid=meta.get("uid"),
        ordinal=names.ordinal_of(pool, meta.get("name", "")),
        ip=ip,
        ready=condition_true and ip is not None and not failed and not terminating,
        failed=failed,
        terminating=terminating,
        ready_changed=_parse_time((ready_condition or {}).get("lastTransitionTime")),
    )


def decide(
    status: Mapping[str, Any],
    pod: PodView | None,
    *,
    now: datetime.datetime,
    grace: datetime.timedelta,
    unready_since: datetime.datetime | None = None,
) -> tuple[Move, str]:
    """Whether an adapter with this ``status`` stays on ``pod`` (its current pod, if it exists).

    ``unready_since`` is when the operator first saw the pod not Ready; it stands in for the Ready
    condition's transition time when the pod has none. Returns the move and a reason for Events.
    """
    if not status.get("pod"):
        return Move.PLACE, "NotPlaced"
    if pod is None:
        return Move.REPLACE, f"pod {status['pod']} is gone"
    if status.get("podUID") and pod.uid and status["podUID"] != pod.uid:
        return Move.REPLACE, f"pod {pod.name} was replaced by a new pod (its cache went with the old one)"
    if pod.failed or pod.terminating:
        return Move.REPLACE, f"pod {pod.name} is {'failed' if pod.failed else 'terminating'}"
    if pod.ready:
        return Move.KEEP, "PodReady"
    since = pod.ready_changed or unready_since or now
    if now - since > grace:
        return Move.REPLACE, f"pod {pod.name} has not been Ready for more than {grace.total_seconds():g}s"
    return Move.WAIT, f"pod {pod.name} is not Ready"


def loads(
    pods: Iterable[PodView],
    placed_on: Iterable[str | None],
    cache_bytes: Mapping[str, int],
    replicas: int,
) -> list[PodLoad]:
    """The Ready pods within ``replicas`` with their adapter counts (``placed_on``: each adapter's pod)."""
    counts: dict[str, int] = {}
    for pod_name in placed_on:
        if pod_name:
            counts[pod_name] = counts.get(pod_name, 0) + 1
    return [
        PodLoad(pod.name, counts.get(pod.name, 0), cache_bytes.get(pod.name, 0), pod.ordinal)
        for pod in pods
        if pod.ready and pod.ordinal is not None and pod.ordinal < replicas
    ]


def choose_pod(candidates: Iterable[PodLoad], max_per_pod: int) -> PodLoad | None:
    """The pod a new adapter goes to, or None when every Ready pod is full (or there is none)."""
    open_pods = [c for c in candidates if c.adapters < max_per_pod]
    if not open_pods:
        return None
    return min(open_pods, key=lambda c: (c.adapters, c.cache_bytes, c.ordinal))
