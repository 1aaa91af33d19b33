"""Leader election with a coordination.k8s.io/v1 Lease, so only one operator replica acts at a time.

Chosen over kopf peering because peering freezes *all* replicas that share a priority (every
replica of a Deployment does), while a Lease gives classic active/standby: the holder renews it
every third of its duration; a standby takes it over once it has not been renewed for a whole
duration. Updates carry the lease's resourceVersion, so two standbys cannot both win: the API
server rejects the second write with a conflict.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
from collections.abc import Callable
from typing import Any

from lorafleet_operator import statuses
from lorafleet_operator.kube import ApiError, KubeApi

logger = logging.getLogger(__name__)


def _micro(now: datetime.datetime) -> str:
    # Lease times are MicroTime: RFC 3339 with microseconds.
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def claim(
    lease: dict[str, Any] | None, identity: str, now: datetime.datetime, duration: float
) -> dict[str, Any] | None:
    """The lease body to write for ``identity`` to hold the lease, or None when another holder's
    lease is still valid. Pure: the caller writes it (create when ``lease`` is None, else update)."""
    spec = dict((lease or {}).get("spec") or {})
    holder = spec.get("holderIdentity")
    renewed = _parse(spec.get("renewTime"))
    held_for = float(spec.get("leaseDurationSeconds") or duration)
    still_valid = renewed is not None and now - renewed < datetime.timedelta(seconds=held_for)
    if holder and holder != identity and still_valid:
        return None
    if holder != identity:
        spec["acquireTime"] = _micro(now)
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
    spec.update(
        holderIdentity=identity, renewTime=_micro(now), leaseDurationSeconds=max(1, math.ceil(duration))
    )
    body = dict(lease or {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {}})
    body["spec"] = spec
    return body


async def lead(
    kube: KubeApi,
    *,
    namespace: str,
    name: str,
    identity: str,
    duration: float,
    acquired: asyncio.Event,
    clock: Callable[[], datetime.datetime] = statuses.now_utc,
) -> None:
    """Acquire the lease (setting ``acquired``) and keep renewing it; returns when it is lost."""
    last_renewal: datetime.datetime | None = None
    while True:
        now = clock()
        try:
            lease = await kube.get_lease(namespace, name)
            body = claim(lease, identity, now, duration)
            if body is not None:
                body.setdefault("metadata", {}).update(namespace=namespace, name=name)
                ok = await (kube.create_lease(body) if lease is None else kube.replace_lease(body))
                if ok:
                    last_renewal = now
                    if not acquired.is_set():
                        logger.info("acquired lease %s/%s as %s", namespace, name, identity)
                        acquired.set()
        except ApiError as exc:
            if exc.status in (401, 403):
                # Not a passing fault: without credentials or RBAC for its Lease this replica never
                # acts, so say so loudly rather than as one more warning.
                logger.error("lease %s/%s refused: %s (check credentials and RBAC)", namespace, name, exc)
            else:
                logger.warning("lease %s/%s: %s", namespace, name, exc)
        if acquired.is_set() and (
            last_renewal is None or clock() - last_renewal > datetime.timedelta(seconds=duration)
        ):
            logger.error("lost lease %s/%s; stopping", namespace, name)
            return
        await asyncio.sleep(duration / 3)
