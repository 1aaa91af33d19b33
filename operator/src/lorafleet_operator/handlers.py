"""The kopf handlers: thin adapters from Kubernetes events to the reconcilers.

``register(registry, settings)`` declares every handler on a registry, so intervals come from the
settings and tests run the operator with a fresh registry. Each handler finds the shared Runtime in
kopf's memo, calls one reconciler and turns its ``Retry`` into kopf's TemporaryError (which kopf
retries with the delay given: exponential backoff for Pending adapters).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from lorafleet_operator import adapting, credentials, evicting, names, pooling
from lorafleet_operator.kube import ApiError
from lorafleet_operator.runtime import Retry, Runtime
from lorafleet_operator.settings import OperatorSettings

POOL = (names.GROUP, names.VERSION, names.POOLS)
ADAPTER = (names.GROUP, names.VERSION, names.ADAPTERS)


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


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Declare all handlers on ``registry``."""
    resync = settings.resync_seconds

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    # The official client's loaders, as for the operator's own calls (in-cluster, kubeconfig, exec).
    kopf.on.login(registry=registry)(credentials.kopf_login)

    @kopf.on.resume(*POOL, registry=registry)
    @kopf.on.create(*POOL, registry=registry)
    @kopf.on.update(*POOL, field="spec", registry=registry)
    async def pool_changed(namespace: str | None, name: str, retry: int, memo: Any, **_: Any) -> None:
        try:
            await pooling.sync_pool(memo.runtime, namespace or "", name)
        except ApiError as exc:
            memo.runtime.metrics.reconcile_errors.inc()
            raise kopf.TemporaryError(str(exc), delay=backoff(memo.runtime.settings, retry)) from exc

    @kopf.timer(*POOL, interval=resync, registry=registry)
    async def pool_resync(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
        with contextlib.suppress(ApiError):  # the next tick tries again
            await pooling.sync_pool(memo.runtime, namespace or "", name)

    @kopf.on.event("", "v1", "pods", labels={names.POOL_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_event(
        type: str, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
    ) -> None:
        # A pod vanished, failed or changed readiness: fix the pool now and move or place the
        # adapters this affects, rather than waiting for the next resync. Other pod updates
        # (annotations, probes' timestamps) change nothing here and are skipped.
        rt: Runtime = memo.runtime
        if not rt.pod_changed(body, deleted=type == "DELETED"):
            return
        pool = labels[names.POOL_LABEL]
        pod = body.get("metadata", {}).get("name")
        with contextlib.suppress(ApiError):
            await pooling.sync_pool(rt, namespace or "", pool, ensure_service=False)
            for adapter in await rt.kube.list_pool_adapters(namespace or "", pool):
                status = adapter.get("status") or {}
                if status.get("pod") in (None, pod) or status.get("phase") == "Pending":
                    # A Pending adapter stays Pending here; its own handler and timer retry it.
                    with contextlib.suppress(Retry, ApiError):
                        await adapting.reconcile(
                            rt, namespace or "", adapter["metadata"]["name"], body=adapter
                        )

    @kopf.on.resume(*ADAPTER, registry=registry)
    @kopf.on.create(*ADAPTER, registry=registry)
    @kopf.on.update(*ADAPTER, field="spec", registry=registry)
    async def adapter_changed(
        namespace: str | None, name: str, body: kopf.Body, retry: int, memo: Any, **_: Any
    ) -> None:
        rt: Runtime = memo.runtime
        try:
            await adapting.reconcile(rt, namespace or "", name, body=dict(body))
        except Retry as exc:
            raise kopf.TemporaryError(str(exc), delay=exc.delay or backoff(rt.settings, retry)) from exc
        except ApiError as exc:
            rt.metrics.reconcile_errors.inc()
            raise kopf.TemporaryError(str(exc), delay=backoff(rt.settings, retry)) from exc

    @kopf.timer(*ADAPTER, interval=resync, registry=registry)
    async def adapter_resync(namespace: str | None, name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
        # The next tick retries; the create handler keeps its own backoff.
        with contextlib.suppress(Retry, ApiError):
            await adapting.reconcile(memo.runtime, namespace or "", name, refresh=True, body=dict(body))

    @kopf.on.delete(*ADAPTER, registry=registry)
    async def adapter_deleted(body: kopf.Body, runtime: datetime.timedelta, memo: Any, **_: Any) -> None:
        try:
            await evicting.release(memo.runtime, dict(body), runtime)
        except (Retry, ApiError) as exc:
            raise kopf.TemporaryError(str(exc), delay=getattr(exc, "delay", None) or 1.0) from exc
