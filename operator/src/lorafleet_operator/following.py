"""Following each trainer pod's changes, so an adapter's status shows a new version within a second.

For every Ready trainer pod the operator keeps one long poll open (``GET /v1/changes``): the trainer
answers as soon as an adapter's state changes (a commit, an init, a server that loaded a version or
failed to), and the operator writes that adapter's status from the answer (``adapting.follow``).
A pod's answers are taken at most every ``INTERVAL_SECONDS``, so a burst of steps costs one status
write per adapter per interval. The resync timer stays the safety net for whatever a follower
misses (a trainer restart, a lost connection, a trainer without the route).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import httpx

from lorafleet_operator import adapting, failures, placing, trainers
from lorafleet_operator.kube import ApiError
from lorafleet_operator.runtime import Follower, Runtime

logger = logging.getLogger(__name__)

WAIT_SECONDS = 20.0  # how long one poll waits for a change
INTERVAL_SECONDS = 0.5  # the least time between two answers taken from one pod
BACKOFF_MAX_SECONDS = 10.0


def track(rt: Runtime, pod: Mapping[str, Any], *, deleted: bool) -> None:
    """Follow ``pod`` while it is a Ready trainer with an address; stop when it is not."""
    meta = pod.get("metadata") or {}
    namespace, name = meta.get("namespace") or "", meta.get("name") or ""
    view = placing.view_pod(pod, "")
    following = not deleted and view.ready and bool(view.ip) and not view.terminating
    url = trainers.endpoint(view.ip, rt.settings.trainer_port) if following and view.ip else ""
    key = (namespace, name)
    current = rt.followers.get(key)
    if current is not None and current.url == url and not current.task.done():
        return
    if current is not None:
        current.stop.set()  # ends after its current poll: cancelling one midway leaks its socket
        del rt.followers[key]
    if url:
        stop = asyncio.Event()
        task = asyncio.create_task(follow(rt, name, url, stop), name=f"follow {namespace}/{name}")
        rt.followers[key] = Follower(url, task, stop)


async def follow(rt: Runtime, pod: str, url: str, stop: asyncio.Event) -> None:
    """Take the pod's changes until ``stop`` is set (or the trainer has no changes route)."""
    async with rt.trainers.connection() as connection:
        await _follow(rt, pod, url, connection, stop)


async def _follow(
    rt: Runtime, pod: str, url: str, connection: httpx.AsyncClient, stop: asyncio.Event
) -> None:
    since, instance, failed = 0, None, 0
    while not stop.is_set():
        try:
            answer = await rt.trainers.changes(url, since, instance, WAIT_SECONDS, via=connection)
        except trainers.TrainerError as exc:
            if exc.status == 404:
                logger.info("trainer %s has no changes route; its adapters follow the resync", pod)
                return
            failed += 1
            await _pause(stop, min(BACKOFF_MAX_SECONDS, 0.5 * 2**failed))
            continue
        failed = 0
        if answer.instance != instance:
            # First contact, or the trainer restarted: follow from now (the resync catches up).
            since, instance = answer.seq, answer.instance
            continue
        since = answer.seq
        for state in answer.adapters:
            try:
                await adapting.follow(rt, pod, state)
            except ApiError as exc:
                failures.skipped(
                    rt.metrics, "adapter_follow", f"loraadapter {state.namespace}/{state.name}", exc
                )
        await _pause(stop, INTERVAL_SECONDS)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when asked to stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
