"""Where each adapter lives: its trainer's endpoint and its pool's inference servers.

``Directory.adapters()`` answers from the cluster: LoraAdapters (``status.endpoint``, the served
name), their TrainerPools (``spec.serving``) and the Ready server pods those select. Placement and
servers change rarely, so the answer is cached for a second and read again at once after a failure
(``refresh``); what each server serves, which changes with every step, is never read from here but
asked of the adapter's trainer (``routing``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lorafleet_api import adapters, pools, selectors

GROUP, VERSION = "lorafleet.io", "v1alpha1"


@dataclass(frozen=True)
class Adapter:
    namespace: str
    name: str
    served_name: str
    endpoint: str | None  # the trainer's base URL; None while the adapter is not placed
    servers: Mapping[str, str] = field(default_factory=dict)  # server pod name -> base URL

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Directory(Protocol):
    async def adapters(self) -> Sequence[Adapter]: ...

    async def refresh(self) -> None: ...


class StaticDirectory:
    """A fixed list (the gateway run beside one trainer and one server, and tests of the routes)."""

    def __init__(self, known: Sequence[Adapter]) -> None:
        self.known = list(known)

    async def adapters(self) -> Sequence[Adapter]:
        return list(self.known)

    async def refresh(self) -> None:
        return None


def _ready_url(pod: Mapping[str, Any], port: int) -> tuple[str, str] | None:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    if not ready or not ip or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return pod["metadata"]["name"], f"http://{host}:{port}"


def assemble(
    adapter_bodies: Sequence[Mapping[str, Any]],
    pool_bodies: Sequence[Mapping[str, Any]],
    pods_of: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
) -> list[Adapter]:
    """The directory from listed objects; ``pods_of[(namespace, pool)]``: the pods its selector lists."""
    servers: dict[tuple[str, str], dict[str, str]] = {}
    for body in pool_bodies:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            serving = pools.PoolSpec.model_validate(body.get("spec") or {}).serving
        except ValueError:
            continue
        if serving is None:
            continue
        found = {}
        for pod in pods_of.get(key, ()):
            if selectors.matches(serving.selector, (pod.get("metadata") or {}).get("labels") or {}):
                ready = _ready_url(pod, serving.port)
                if ready is not None:
                    found[ready[0]] = ready[1]
        servers[key] = found
    out = []
    for body in adapter_bodies:
        meta, status = body["metadata"], body.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        try:
            spec = adapters.parse_spec(dict(body))
        except ValueError:
            continue
        endpoint = status.get("endpoint") if status.get("phase") == "Ready" else None
        out.append(
            Adapter(
                namespace=meta["namespace"],
                name=meta["name"],
                served_name=spec.served_name(meta["name"]),
                endpoint=endpoint,
                servers=servers.get((meta["namespace"], spec.pool), {}),
            )
        )
    return out


class KubeDirectory:
    """The directory read from the Kubernetes API with the official client (in-cluster config, or
    KUBECONFIG), cached for ``ttl`` seconds; ``namespaces`` (empty: every namespace) are the ones
    the gateway's RBAC lets it read."""

    def __init__(self, namespaces: Sequence[str] = (), ttl: float = 1.0) -> None:
        self._namespaces = list(namespaces)
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._custom = client.CustomObjectsApi()
        self._core = client.CoreV1Api()
        self._ttl = ttl
        self._read_at = -1e9
        self._known: list[Adapter] = []
        self._lock = asyncio.Lock()

    async def adapters(self) -> Sequence[Adapter]:
        async with self._lock:
            if time.monotonic() - self._read_at > self._ttl:
                self._known = await asyncio.to_thread(self._read)
                self._read_at = time.monotonic()
            return list(self._known)

    async def refresh(self) -> None:
        async with self._lock:
            self._read_at = -1e9

    def _list(self, plural: str) -> list[dict[str, Any]]:
        if not self._namespaces:
            body: dict[str, Any] = self._custom.list_cluster_custom_object(GROUP, VERSION, plural)  # type: ignore[assignment]
            items: list[dict[str, Any]] = body["items"]
            return items
        out: list[dict[str, Any]] = []
        for namespace in self._namespaces:
            listed: dict[str, Any] = self._custom.list_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, namespace, plural
            )
            out += listed["items"]
        return out

    def _read(self) -> list[Adapter]:
        listed: list[dict[str, Any]] = self._list("loraadapters")
        pool_bodies: list[dict[str, Any]] = self._list("trainerpools")
        pods_of: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for body in pool_bodies:
            serving = (body.get("spec") or {}).get("serving")
            if not serving:
                continue
            meta = body["metadata"]
            try:
                selector = selectors.selector_string(serving.get("selector") or {})
            except selectors.SelectorError:
                continue
            pods = self._core.list_namespaced_pod(meta["namespace"], label_selector=selector)
            pods_of[(meta["namespace"], meta["name"])] = [p.to_dict() for p in pods.items]
        return assemble(listed, pool_bodies, {k: [_camel(p) for p in v] for k, v in pods_of.items()})


def _camel(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The few fields of the client's snake_case pod dict that ``assemble`` reads, as the API has them."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": meta.get("labels") or {},
            "deletionTimestamp": meta.get("deletion_timestamp"),
        },
        "status": {
            "podIP": status.get("pod_ip"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")} for c in status.get("conditions") or []
            ],
        },
    }
