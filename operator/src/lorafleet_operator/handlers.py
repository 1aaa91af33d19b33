"""The kopf handlers: thin adapters from Kubernetes events to the reconcilers.

``register(registry, settings)`` declares every handler on a registry, so intervals come from the
settings and tests run the operator with a fresh registry. Each handler finds the shared Runtime in
kopf's memo and calls one of the functions below, which call one reconciler each. An error that
kopf retries (the change and deletion handlers) becomes kopf's TemporaryError with the delay
given (exponential backoff for Pending adapters); one that a timer or a pod event skips is logged
and counted (``failures``), since the next tick tries again. ``Waiting`` (no pod can take an
adapter yet) is no error: the adapter's status says what it waits for.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from lorafleet_operator import (
    adapting,
    credentials,
    evicting,
    failures,
    following,
    names,
    pooling,
    publishing,
)
from lorafleet_operator.kube import ApiError
from lorafleet_operator.runtime import Retry, Runtime, Waiting
from lorafleet_operator.settings import OperatorSettings

POOL = (names.GROUP, names.VERSION, names.POOLS)
ADAPTER = (names.GROUP, names.VERSION, names.ADAPTERS)

logger = logging.getLogger(__name__)


def backoff(settings: OperatorSettings, retry: int) -> float:
    """Delay before retry number ``retry`` (0-based) of a Pending adapter."""
    return float(min(settings.pending_backoff_seconds * 2**retry, settings.pending_backoff_max_seconds))


def configure(kopf_settings: kopf.OperatorSettings) -> None:
    """kopf's own settings: LoraFleet's finalizer name and annotations, fewer chatty Events."""
    kopf_settings.persistence.finalizer = names.FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    # Only warnings from kopf's logs become Events; the operator posts its own meaningful ones.
    kopf_settings.posting.level = logging.WARNING


# ---- what each handler does ------------------------------------------------------------------


async def change_pool(rt: Runtime, namespace: str, name: str, retry: int) -> None:
    """A TrainerPool was created, changed or found at start: sync it; kopf retries a failure."""
    try:
        await pooling.sync_pool(rt, namespace, name)
    except ApiError as exc:
        failures.retried(rt.metrics, "pool_change")
        raise kopf.TemporaryError(str(exc), delay=backoff(rt.settings, retry)) from exc


async def resync_pool(rt: Runtime, namespace: str, name: str) -> None:
    """The pool's periodic sync; a failure is skipped (the next tick tries again)."""
    try:
        await pooling.sync_pool(rt, namespace, name)
    except ApiError as exc:
        failures.skipped(rt.metrics, "pool_resync", f"trainerpool {namespace}/{name}", exc)


async def pod_changed(rt: Runtime, namespace: str, pool: str, pod: str | None) -> None:
    """A trainer pod vanished, failed or changed readiness: fix the pool now and move or place the
    adapters this affects, rather than waiting for the next resync."""
    try:
        await pooling.sync_pool(rt, namespace, pool, ensure_service=False)
        affected = await rt.kube.list_pool_adapters(namespace, pool)
    except ApiError as exc:
        failures.skipped(rt.metrics, "pod_event", f"pod {namespace}/{pod} of trainerpool {pool}", exc)
        return
    for adapter in affected:
        status = adapter.get("status") or {}
        if status.get("pod") not in (None, pod) and status.get("phase") != "Pending":
            continue
        name = adapter["metadata"]["name"]
        try:
            await adapting.reconcile(rt, namespace, name, body=adapter)
        except Waiting as exc:
            # A Pending adapter stays Pending here (its status says why); its own handler and timer retry it.
            logger.debug("loraadapter %s/%s waits: %s", namespace, name, exc)
        except (Retry, ApiError) as exc:
            failures.skipped(rt.metrics, "pod_event_adapter", f"loraadapter {namespace}/{name}", exc)


async def change_adapter(rt: Runtime, namespace: str, name: str, body: dict[str, Any], retry: int) -> None:
    """A LoraAdapter was created, changed or found at start: reconcile it; kopf retries."""
    try:
        await adapting.reconcile(rt, namespace, name, body=body)
    except Retry as exc:
        if not isinstance(exc, Waiting):
            failures.retried(rt.metrics, "adapter_change")
        raise kopf.TemporaryError(str(exc), delay=exc.delay or backoff(rt.settings, retry)) from exc
    except ApiError as exc:
        failures.retried(rt.metrics, "adapter_change")
        raise kopf.TemporaryError(str(exc), delay=backoff(rt.settings, retry)) from exc


async def resync_adapter(rt: Runtime, namespace: str, name: str, body: dict[str, Any]) -> None:
    """The adapter's periodic check (and trainer poll); a failure is skipped (the next tick tries
    again; the change handler keeps its own backoff)."""
    try:
        await adapting.reconcile(rt, namespace, name, refresh=True, body=body)
    except Waiting as exc:
        logger.debug("loraadapter %s/%s waits: %s", namespace, name, exc)
    except (Retry, ApiError) as exc:
        failures.skipped(rt.metrics, "adapter_resync", f"loraadapter {namespace}/{name}", exc)


async def delete_adapter(rt: Runtime, body: dict[str, Any], elapsed: datetime.timedelta) -> None:
    """A LoraAdapter is being deleted: evict it; kopf retries until the eviction timeout."""
    try:
        await evicting.release(rt, body, elapsed)
    except (Retry, ApiError) as exc:
        failures.retried(rt.metrics, "adapter_delete")
        raise kopf.TemporaryError(str(exc), delay=getattr(exc, "delay", None) or 1.0) from exc
    # An adapter that waited for its served name gets it now rather than at the next resync.
    await publishing.name_freed(rt, body["metadata"]["namespace"], body["metadata"]["name"])


# ---- the kopf declarations -------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Declare all handlers on ``registry``."""
    resync = settings.resync_seconds

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        # Before kopf cancels what is left: a follower cancelled mid-poll would leak its socket.
        await memo.runtime.stop_following()

    # The official client's loaders, as for the operator's own calls (in-cluster, kubeconfig, exec).
    kopf.on.login(registry=registry)(credentials.kopf_login)

    @kopf.on.resume(*POOL, registry=registry)
    @kopf.on.create(*POOL, registry=registry)
    @kopf.on.update(*POOL, field="spec", registry=registry)
    async def pool_changed(namespace: str | None, name: str, retry: int, memo: Any, **_: Any) -> None:
        await change_pool(memo.runtime, namespace or "", name, retry)

    @kopf.timer(*POOL, interval=resync, registry=registry)
    async def pool_resync(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
        await resync_pool(memo.runtime, namespace or "", name)

    @kopf.on.event("", "v1", "pods", labels={names.POOL_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_event(
        type: str, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
    ) -> None:
        rt: Runtime = memo.runtime
        # A Ready trainer is followed (its changes reach the statuses at once); a gone one is not.
        following.track(rt, body, deleted=type == "DELETED")
        # Other pod updates (annotations, probes' timestamps) change nothing here and are skipped.
        if rt.pod_changed(body, deleted=type == "DELETED"):
            pod = body.get("metadata", {}).get("name")
            await pod_changed(rt, namespace or "", labels[names.POOL_LABEL], pod)

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def server_event(
        type: str, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
    ) -> None:
        # Inference server pods (a pool's spec.serving.selector): a new, gone or re-addressed
        # server is told to the pool's trainers now, so a restarted server is served again at once.
        rt: Runtime = memo.runtime
        selecting = publishing.pools_selecting(rt, namespace or "", labels)
        if selecting and rt.pod_changed(body, deleted=type == "DELETED"):
            for pool in selecting:
                await publishing.server_changed(rt, namespace or "", pool)

    @kopf.on.resume(*ADAPTER, registry=registry)
    @kopf.on.create(*ADAPTER, registry=registry)
    @kopf.on.update(*ADAPTER, field="spec", registry=registry)
    async def adapter_changed(
        namespace: str | None, name: str, body: kopf.Body, retry: int, memo: Any, **_: Any
    ) -> None:
        await change_adapter(memo.runtime, namespace or "", name, dict(body), retry)

    @kopf.timer(*ADAPTER, interval=resync, registry=registry)
    async def adapter_resync(namespace: str | None, name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
        await resync_adapter(memo.runtime, namespace or "", name, dict(body))

    @kopf.on.delete(*ADAPTER, registry=registry)
    async def adapter_deleted(body: kopf.Body, runtime: datetime.timedelta, memo: Any, **_: Any) -> None:
        await delete_adapter(memo.runtime, dict(body), runtime)
