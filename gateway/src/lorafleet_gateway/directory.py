"""Where each adapter lives: its trainer's endpoint and its pool's inference servers.

``Directory.adapters()`` answers from the cluster: LoraAdapters (``status.endpoint``, the served
name), their TrainerPools (``spec.serving``), the Ready server pods those select and the API key
those servers require (the Secret ``spec.serving.apiKeySecretRef`` names, or why it cannot be
had: the gateway then answers with that instead of a refusal from the server). Placement and
servers change rarely, so the answer is cached for a second and read again at once after a failure
(``refresh``); what each server serves, which changes with every step, is never read from here but
asked of the adapter's trainer (``routing``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lorafleet_api import adapters, pools, selectors

GROUP, VERSION = "lorafleet.io", "v1alpha1"


@dataclass(frozen=True)
class ServerKey:
    """The API key a pool's servers require (``secret``: where it is kept, for messages): the key,
    or ``problem``, why there is none to send. The key never shows in a repr or a log line."""

    secret: str
    value: str | None = field(default=None, repr=False)
    problem: str | None = None

    @classmethod
    def of(cls, namespace: str, ref: pools.SecretRef, data: Mapping[str, str] | str | None) -> ServerKey:
        """From the Secret's decoded ``data``, else why it could not be read (None: not read)."""
        secret = f"key {ref.key!r} of Secret {namespace}/{ref.name}"
        if data is None or isinstance(data, str):
            return cls(secret, problem=f"{secret} {data or 'was not read'}")
        value = (data.get(ref.key) or "").strip()
        if ref.key not in data:
            return cls(secret, problem=f"{secret} does not exist: the Secret has no such key")
        if not value:
            return cls(secret, problem=f"{secret} is empty")
        return cls(secret, value=value)


@dataclass(frozen=True)
class Adapter:
    namespace: str
    name: str
    served_name: str
    endpoint: str | None  # the trainer's base URL; None while the adapter is not placed
    servers: Mapping[str, str] = field(default_factory=dict)  # server pod name -> base URL
    server_key: ServerKey | None = None  # None: its servers require no API key

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
    secrets: Mapping[tuple[str, str], Mapping[str, str] | str] | None = None,
) -> list[Adapter]:
    """The directory from listed objects; ``pods_of[(namespace, pool)]``: the pods its selector lists;
    ``secrets[(namespace, name)]``: a Secret's decoded data, or why it could not be read."""
    servers: dict[tuple[str, str], dict[str, str]] = {}
    keys: dict[tuple[str, str], ServerKey] = {}
    for body in pool_bodies:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            serving = pools.PoolSpec.model_validate(body.get("spec") or {}).serving
        except ValueError:
            continue
        if serving is None:
            continue
        ref = serving.api_key_secret_ref
        if ref is not None:
            keys[key] = ServerKey.of(key[0], ref, (secrets or {}).get((key[0], ref.name)))
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
                server_key=keys.get((meta["namespace"], spec.pool)),
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
        secrets: dict[tuple[str, str], dict[str, str] | str] = {}
        for body in pool_bodies:
            serving = (body.get("spec") or {}).get("serving")
            if not serving:
                continue
            meta = body["metadata"]
            ref = serving.get("apiKeySecretRef") or {}
            if ref.get("name") and (meta["namespace"], ref["name"]) not in secrets:
                secrets[(meta["namespace"], ref["name"])] = self._secret(meta["namespace"], ref["name"])
            try:
                selector = selectors.selector_string(serving.get("selector") or {})
            except selectors.SelectorError:
                continue
            pods = self._core.list_namespaced_pod(meta["namespace"], label_selector=selector)
            pods_of[(meta["namespace"], meta["name"])] = [p.to_dict() for p in pods.items]
        return assemble(listed, pool_bodies, {k: [_camel(p) for p in v] for k, v in pods_of.items()}, secrets)

    def _secret(self, namespace: str, name: str) -> dict[str, str] | str:
        """A Secret's data, decoded, else why it cannot be read (the answer names no value)."""
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return "does not exist: there is no such Secret"
            if exc.status == 403:
                return "cannot be read: the gateway's RBAC does not let it get Secrets in that namespace"
            return f"cannot be read: the API server answered {exc.status} {exc.reason}"
        data = secret.data or {}
        return {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in data.items()}


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
