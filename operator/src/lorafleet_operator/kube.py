"""The one module that talks to the Kubernetes API, through the official ``kubernetes`` client.

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

The client is synchronous, so each call runs on a small thread pool of its own and the event loop
never waits on the network. Reads keep the server's JSON as plain dicts (``_preload_content=False``)
rather than the client's models: handlers work on the same shapes kopf hands them. Pods are posted
as built; core/v1 calls use the client's generic request path (see ``_Apis.core``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pydantic
import urllib3
from kubernetes import client

from lorafleet_operator import credentials, names

MERGE_PATCH = "application/merge-patch+json"
Model = TypeVar("Model", bound=client.V1Lease)
PODS = "/api/v1/namespaces/{namespace}/pods"
POD = PODS + "/{name}"
SERVICES = "/api/v1/namespaces/{namespace}/services"
_QUERY = {"label_selector": "labelSelector"}
# Concurrent API calls of one operator; the connection pool keeps as many connections open.
WORKERS = 16


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


def _error(what: str, exc: client.ApiException) -> ApiError:
    status = int(exc.status or 0)
    try:
        message = json.loads(exc.body or "").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.body or exc.reason
    return {404: NotFound, 409: Conflict}.get(status, ApiError)(status, f"{what}: {message}")


class _Apis:
    """The typed APIs over one ApiClient (one login)."""

    def __init__(self, configuration: client.Configuration) -> None:
        configuration.connection_pool_maxsize = WORKERS
        self.api_client = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)

    def core(self, method: str, path: str, timeout: float, *, body: Any = None, **params: str) -> Any:
        """One core/v1 request through the client's own request path (login, TLS, errors).

        Not CoreV1Api: in this client version importing it costs about 20 MiB of resident memory
        for the five calls the operator makes, and its V1Pod model refuses integer quantities
        (``nvidia.com/gpu: 1``) that the API server takes; pods must reach it as built."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        query = [(key, value) for key, value in params.items() if f"{{{key}}}" not in path]
        request = self.api_client.param_serialize(
            method,
            path,
            {key: value for key, value in params.items() if f"{{{key}}}" in path},
            query_params=[(_QUERY.get(k, k), v) for k, v in query],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise client.ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def close(self) -> None:
        self.api_client.rest_client.pool_manager.clear()
        self.api_client.close()


class KubeApi:
    """Typed-enough access to the few resources the operator manages."""

    def __init__(
        self,
        configuration: client.Configuration,
        *,
        relogin: Callable[[], client.Configuration] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """``configuration`` comes from ``credentials.load()``; ``relogin`` gives a fresh one
        after a 401 (a token that was revoked or expired without saying when)."""
        self._relogin = relogin
        self._timeout = timeout
        self._apis = _Apis(configuration)
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="kube-api")

    async def close(self) -> None:
        self._apis.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _call(self, what: str, request: Callable[[_Apis], Any]) -> Any:
        """Run ``request`` on the pool; the decoded JSON answer, or ApiError naming ``what``."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            apis = self._apis
            try:
                return await loop.run_in_executor(self._pool, _decode, request, apis)
            except client.ApiException as exc:
                if exc.status == 401 and self._relogin is not None and attempt == 1:
                    # Credentials rotate (service-account tokens, exec plugins): log in again once.
                    await self._login_again(apis)
                    continue
                raise _error(what, exc) from exc
            except urllib3.exceptions.HTTPError as exc:
                raise ApiError(0, f"{what}: {exc!r}") from exc
            except pydantic.ValidationError as exc:
                raise ApiError(0, f"{what}: the body does not fit the Kubernetes schema: {exc}") from exc
        raise AssertionError("unreachable")

    async def _login_again(self, stale: _Apis) -> None:
        assert self._relogin is not None
        configuration = await asyncio.get_running_loop().run_in_executor(self._pool, self._relogin)
        if self._apis is stale:  # a concurrent call may have logged in already
            self._apis = _Apis(configuration)
            stale.close()

    def _options(self) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": self._timeout}

    # ---- pods and services -------------------------------------------------------------------

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods of ``namespace`` matching a label selector in its string form."""
        body = await self._call(
            f"list pods {namespace}/{selector}",
            lambda a: a.core("GET", PODS, self._timeout, namespace=namespace, label_selector=selector),
        )
        items: list[dict[str, Any]] = body.get("items", [])
        return items

    async def list_pool_pods(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        selector = f"{names.POOL_LABEL}={pool}"
        body = await self._call(
            f"list pods {namespace}/{selector}",
            lambda a: a.core("GET", PODS, self._timeout, namespace=namespace, label_selector=selector),
        )
        # Filter again: a server that ignores the selector must not make us adopt foreign pods.
        return [
            item
            for item in body.get("items", [])
            if (item.get("metadata", {}).get("labels") or {}).get(names.POOL_LABEL) == pool
        ]

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call(
                f"get pod {namespace}/{name}",
                lambda a: a.core("GET", POD, self._timeout, namespace=namespace, name=name),
            )
        except NotFound:
            return None
        return result

    async def create_pod(self, pod: dict[str, Any]) -> bool:
        """Create a pod; False when one of that name already exists (so creation is idempotent)."""
        namespace = pod["metadata"]["namespace"]
        return await self._create(
            f"create pod {namespace}/{pod['metadata'].get('name')}",
            lambda a: a.core("POST", PODS, self._timeout, body=pod, namespace=namespace),
        )

    async def delete_pod(self, namespace: str, name: str) -> bool:
        try:
            await self._call(
                f"delete pod {namespace}/{name}",
                lambda a: a.core("DELETE", POD, self._timeout, namespace=namespace, name=name),
            )
        except NotFound:
            return False
        return True

    async def create_service(self, service: dict[str, Any]) -> bool:
        namespace = service["metadata"]["namespace"]
        return await self._create(
            f"create service {namespace}/{service['metadata'].get('name')}",
            lambda a: a.core("POST", SERVICES, self._timeout, body=service, namespace=namespace),
        )

    async def _create(self, what: str, request: Callable[[_Apis], Any]) -> bool:
        try:
            await self._call(what, request)
        except Conflict:
            return False
        return True

    # ---- LoraFleet resources -----------------------------------------------------------------

    async def get_pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_custom(names.POOLS, namespace, name)

    async def get_adapter(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_custom(names.ADAPTERS, namespace, name)

    async def _get_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call(
                f"get {plural} {namespace}/{name}",
                lambda a: a.custom.get_namespaced_custom_object(
                    names.GROUP, names.VERSION, namespace, plural, name, **self._options()
                ),
            )
        except NotFound:
            return None
        return result

    async def list_adapters(self, namespace: str) -> list[dict[str, Any]]:
        body = await self._call(
            f"list {names.ADAPTERS} {namespace}",
            lambda a: a.custom.list_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.ADAPTERS, **self._options()
            ),
        )
        items: list[dict[str, Any]] = body.get("items", [])
        return items

    async def list_pool_adapters(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        return [item for item in await self.list_adapters(namespace) if of_pool(item, pool)]

    async def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._patch_status(names.POOLS, namespace, name, status)

    async def patch_adapter_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._patch_status(names.ADAPTERS, namespace, name, status)

    async def _patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._call(
            f"patch {plural}/status {namespace}/{name}",
            lambda a: a.custom.patch_namespaced_custom_object_status(
                names.GROUP,
                names.VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
                **self._options(),
            ),
        )

    # ---- leases ------------------------------------------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call(
                f"get lease {namespace}/{name}",
                lambda a: a.coordination.read_namespaced_lease(name, namespace, **self._options()),
            )
        except NotFound:
            return None
        return result

    async def create_lease(self, lease: dict[str, Any]) -> bool:
        namespace = lease["metadata"]["namespace"]
        return await self._create(
            f"create lease {namespace}/{lease['metadata'].get('name')}",
            lambda a: a.coordination.create_namespaced_lease(
                namespace, _model(client.V1Lease, lease), **self._options()
            ),
        )

    async def replace_lease(self, lease: dict[str, Any]) -> bool:
        """Update (PUT) a lease; False when someone else changed it first: the body carries the
        resourceVersion it was read at, and the API server answers 409 when that is stale."""
        namespace, name = lease["metadata"]["namespace"], lease["metadata"]["name"]
        return await self._create(
            f"update lease {namespace}/{name}",
            lambda a: a.coordination.replace_namespaced_lease(
                name, namespace, _model(client.V1Lease, lease), **self._options()
            ),
        )


def _model(kind: type[Model], body: dict[str, Any]) -> Model:
    """``body`` as the client's typed model (runs on a pool thread: validating costs CPU)."""
    model = kind.from_dict(body)
    if model is None:
        raise ApiError(0, f"empty {kind.__name__} body")
    return model


def _decode(request: Callable[[_Apis], Any], apis: _Apis) -> Any:
    """Send one request (on a pool thread) and decode its JSON answer, releasing the connection."""
    response: urllib3.BaseHTTPResponse = request(apis)
    try:
        data = response.data
    finally:
        response.release_conn()
    return json.loads(data) if data else {}


def connect() -> client.Configuration:
    """Credentials for the API; see ``credentials.load``."""
    return credentials.load()


def of_pool(adapter: Mapping[str, Any], pool: str) -> bool:
    """Whether a LoraAdapter body names ``pool``."""
    return bool((adapter.get("spec") or {}).get("pool") == pool)
