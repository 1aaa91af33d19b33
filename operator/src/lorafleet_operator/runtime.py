"""The shared state of one running operator: settings, API clients, metrics, locks and a clock.

Handlers receive it through kopf's memo. The per-pool lock serialises placement decisions within a
pool, so two adapters created at the same moment cannot both pick the same "least loaded" pod: each
decision re-reads the placements under the lock and writes its own before releasing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf

from lorafleet_operator import names, placing, statuses
from lorafleet_operator.kube import KubeApi
from lorafleet_operator.metrics import OperatorMetrics
from lorafleet_operator.settings import OperatorSettings
from lorafleet_operator.trainers import TrainerClient


class Retry(Exception):
    """The reconcile could not finish yet (no Ready pod, trainer unreachable); try again later."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class Waiting(Retry):
    """Try again later because the adapter waits on the cluster (no pod can take it yet), not
    because anything failed: its status and conditions say what it waits for."""


@dataclasses.dataclass
class Runtime:
    settings: OperatorSettings
    kube: KubeApi
    trainers: TrainerClient
    metrics: OperatorMetrics
    clock: Callable[[], datetime.datetime] = statuses.now_utc
    _locks: dict[tuple[str, str], asyncio.Lock] = dataclasses.field(default_factory=dict)
    # When this operator first saw a pod not Ready (for pods whose Ready condition has no time).
    _unready: dict[str, datetime.datetime] = dataclasses.field(default_factory=dict)
    # Adapters (by uid) whose deletion this process finished: a stale event that replays the
    # deletion handler must not send a second eviction.
    released: set[str] = dataclasses.field(default_factory=set)
    # The last seen placement-relevant state of each trainer pod (see pod_changed), to skip pod
    # events that change none of it.
    _pods: dict[tuple[str, str], tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    # (namespace, pool) -> spec.serving.selector of the pools that publish: which pod events matter.
    serving_selectors: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    # namespace -> {adapter: the adapter that holds its served name}, as the last serving sync saw
    # them: those adapters are not published, and their status says why.
    names_taken: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # (namespace, trainer pod) -> the follower of that pod's changes (following.py).
    followers: dict[tuple[str, str], Follower] = dataclasses.field(default_factory=dict)
    _adapter_locks: dict[tuple[str, str], asyncio.Lock] = dataclasses.field(default_factory=dict)

    def pool_lock(self, namespace: str, pool: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, pool), asyncio.Lock())

    def adapter_lock(self, namespace: str, name: str) -> asyncio.Lock:
        """Held while an adapter's trainer state is read and written to its status, so a follower's
        report and a resync's poll are written in the order they were read."""
        return self._adapter_locks.setdefault((namespace, name), asyncio.Lock())

    def unready_since(self, pod: placing.PodView | None) -> datetime.datetime | None:
        """Remember when ``pod`` was first seen not Ready; forget it once it is Ready again."""
        if pod is None:
            return None
        key = pod.uid or pod.name
        if pod.ready:
            self._unready.pop(key, None)
            return None
        return self._unready.setdefault(key, self.clock())

    def pod_changed(self, pod: Mapping[str, Any], *, deleted: bool) -> bool:
        """Whether this pod event matters for placement: new, gone, or readiness/failure changed."""
        meta = pod.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if deleted:
            self._pods.pop(key, None)
            return True
        view = placing.view_pod(pod, (meta.get("labels") or {}).get(names.POOL_LABEL, ""))
        state = (view.uid, view.ready, view.failed, view.terminating, view.ip)
        if self._pods.get(key) == state:
            return False
        self._pods[key] = state
        return True

    async def stop_following(self, grace: float = 2.0) -> None:
        """Ask every follower to stop after its current poll; cancel those still polling after
        ``grace`` seconds (a poll cancelled midway closes its own connection)."""
        followers, self.followers = list(self.followers.values()), {}
        for follower in followers:
            follower.stop.set()
        tasks = [f.task for f in followers if not f.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def close(self) -> None:
        await self.stop_following()
        await self.trainers.close()
        await self.kube.close()


@dataclasses.dataclass
class Follower:
    """The task following one trainer pod's changes at ``url``; ``stop`` ends it after its poll."""

    url: str
    task: asyncio.Task[None]
    stop: asyncio.Event


def announce(body: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """Post a Kubernetes Event on ``body``. kopf.event (not kopf.info) so that kopf's posting level,
    which only silences kopf's own log-derived Events, never drops LoraFleet's."""
    kopf.event(cast(kopf.Body, body), type="Warning" if warning else "Normal", reason=reason, message=message)
