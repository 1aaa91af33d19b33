"""The one module that talks to the Kubernetes API (async, over httpx).

Everything the operator reads or writes in the cluster goes through ``KubeApi``, so the RBAC the
Helm chart grants is exactly this list. Calls made here:

- pods (core/v1): list (labelSelector ``lorafleet.io/pool``), get, create, delete
- services (core/v1): create
- trainerpools.lorafleet.io: get; trainerpools/status: patch
- loraadapters.lorafleet.io: list, get; loraadapters/status: patch
- leases.coordination.k8s.io (the operator's namespace): get, create, update

kopf itself additionally needs: list/watch/patch on trainerpools and loraadapters (it adds the
finalizer and keeps its progress in annotations), list/watch on pods, create on events (core/v1 and
events.k8s.io), list/watch on customresourcedefinitions and namespaces.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import httpx
import kopf

from lorafleet_operator import names

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP code (0 when the server was unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def _ssl_context(info: Any, scratch: list[str]) -> ssl.SSLContext | bool:
    if getattr(info, "insecure", False):
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        context.load_verify_locations(cadata=pem_text(info.ca_data))
    cert = info.certificate_path or _spill(info.certificate_data, scratch)
    key = info.private_key_path or _spill(info.private_key_data, scratch)
    if cert:
        context.load_cert_chain(os.fsdecode(cert), os.fsdecode(key) if key else None)
    return context


def pem_text(data: str | bytes) -> str:
    """PEM text from a kubeconfig's ``*-data`` field, which holds base64 of the PEM file."""
    text = data.decode("ascii") if isinstance(data, bytes) else data
    if "-----BEGIN" in text:
        return text
    try:
        return base64.b64decode(text, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ApiError(0, "kubeconfig certificate data is neither PEM nor base64 of PEM") from exc


def _spill(data: str | bytes | None, scratch: list[str]) -> str | None:
    # ssl can only load client certificates from files; these live as long as the client.
    if not data:
        return None
    fd, path = tempfile.mkstemp(prefix="lorafleet-kube-", suffix=".pem")
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem_text(data).encode("ascii"))
    scratch.append(path)
    return path


class KubeApi:
    """Typed-enough access to the few resources the operator manages."""

    def __init__(self, info: Any, *, relogin: Callable[[], Any] | None = None, timeout: float = 30.0) -> None:
        """``info`` is a kopf ConnectionInfo; ``relogin`` returns a fresh one after a 401."""
        self._relogin = relogin
        self._timeout = timeout
        self._scratch: list[str] = []
        self._client = self._make_client(info)

    def _make_client(self, info: Any) -> httpx.AsyncClient:
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = httpx.BasicAuth(info.username, info.password or "") if info.username else None
        return httpx.AsyncClient(
            base_url=info.server.rstrip("/"),
            headers=headers,
            auth=auth,
            verify=_ssl_context(info, self._scratch),
            timeout=httpx.Timeout(self._timeout),
        )

    async def close(self) -> None:
        await self._client.aclose()
        for path in self._scratch:
            os.unlink(path)
        self._scratch.clear()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        if response.status_code == 401 and self._relogin is not None:
            # Service-account tokens rotate; log in again once and retry.
            await self._client.aclose()
            self._client = self._make_client(self._relogin())
            response = await self._send(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            error = {404: NotFound, 409: Conflict}.get(response.status_code, ApiError)
            raise error(response.status_code, f"{method} {path}: {message}")
        return response.json() if response.content else {}

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Reads are safe to repeat, so one that times out or loses its connection is tried again.
        attempts = 2 if method == "GET" else 1
        for attempt in range(attempts):
            try:
                return await self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt + 1 == attempts:
                    raise ApiError(0, f"{method} {path}: {exc!r}") from exc
        raise AssertionError("unreachable")

    # ---- pods and services -------------------------------------------------------------------

    async def list_pool_pods(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        selector = f"{names.POOL_LABEL}={pool}"
        body = await self._call(
            "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector}
        )
        # Filter again: a server that ignores the selector must not make us adopt foreign pods.
        return [
            item
            for item in body.get("items", [])
            if (item.get("metadata", {}).get("labels") or {}).get(names.POOL_LABEL) == pool
        ]

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        except NotFound:
            return None
        return result

    async def create_pod(self, pod: dict[str, Any]) -> bool:
        """Create a pod; False when one of that name already exists (so creation is idempotent)."""
        return await self._create(f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods", pod)

    async def delete_pod(self, namespace: str, name: str) -> bool:
        try:
            await self._call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")
        except NotFound:
            return False
        return True

    async def create_service(self, service: dict[str, Any]) -> bool:
        return await self._create(f"/api/v1/namespaces/{service['metadata']['namespace']}/services", service)

    async def _create(self, path: str, body: dict[str, Any]) -> bool:
        try:
            await self._call("POST", path, json=body)
        except Conflict:
            return False
        return True

    # ---- LoraFleet resources -----------------------------------------------------------------

    def _custom(self, plural: str, namespace: str, name: str | None = None) -> str:
        path = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{namespace}/{plural}"
        return f"{path}/{name}" if name else path

    async def get_pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_custom(names.POOLS, namespace, name)

    async def get_adapter(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_custom(names.ADAPTERS, namespace, name)

    async def _get_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", self._custom(plural, namespace, name))
        except NotFound:
            return None
        return result

    async def list_pool_adapters(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        body = await self._call("GET", self._custom(names.ADAPTERS, namespace))
        return [item for item in body.get("items", []) if (item.get("spec") or {}).get("pool") == pool]

    async def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._patch_status(names.POOLS, namespace, name, status)

    async def patch_adapter_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._patch_status(names.ADAPTERS, namespace, name, status)

    async def _patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._call(
            "PATCH",
            self._custom(plural, namespace, name) + "/status",
            json={"status": status},
            headers={"Content-Type": MERGE_PATCH},
        )

    # ---- leases ------------------------------------------------------------------------------

    def _lease(self, namespace: str, name: str | None = None) -> str:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return f"{path}/{name}" if name else path

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", self._lease(namespace, name))
        except NotFound:
            return None
        return result

    async def create_lease(self, lease: dict[str, Any]) -> bool:
        return await self._create(self._lease(lease["metadata"]["namespace"]), lease)

    async def replace_lease(self, lease: dict[str, Any]) -> bool:
        """Update (PUT) a lease; False when someone else changed it first: the body carries the
        resourceVersion it was read at, and the API server answers 409 when that is stale."""
        meta = lease["metadata"]
        try:
            await self._call("PUT", self._lease(meta["namespace"], meta["name"]), json=lease)
        except Conflict:
            return False
        return True


def connect() -> Any:
    """Credentials for the API: the pod's service account in a cluster, else the kubeconfig
    (``KUBECONFIG`` or ``~/.kube/config``). The same helpers kopf uses, so both agree."""
    kopf_settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=kopf_settings) or kopf.login_with_kubeconfig(
        settings=kopf_settings
    )
    if info is None:
        raise ApiError(0, "no Kubernetes credentials: no service account token and no kubeconfig")
    return info
