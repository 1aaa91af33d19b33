"""The operator's client of the trainer HTTP API (DESIGN.md, v1): init, state, evict, delete, cache.

One async httpx client shared by all handlers, with the bearer token from the operator's token
file. Requests and answers are the wire models of ``lorafleet_api.wire``, the ones the trainer
serves: an answer that does not parse as its model (a field missing or of another type) is an
error, ``TrainerAnswerInvalid``, never a partial status. Every call is counted in
``lorafleet_operator_trainer_requests_total{route,code}``; a trainer that cannot be reached raises
``TrainerUnreachable`` so callers can retry or give up on a timeout.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from lorafleet_api import wire
from lorafleet_operator.metrics import OperatorMetrics

Answer = TypeVar("Answer", bound=BaseModel)


class TrainerError(Exception):
    """The trainer answered with an error; ``status`` is its HTTP code, ``field`` the request
    field its error names (``wire.Error.field``), or ""."""

    def __init__(self, status: int, message: str, field: str = "") -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.field = field


class TrainerUnreachable(TrainerError):
    """The trainer could not be reached (connection refused, timeout)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class TrainerAnswerInvalid(TrainerError):
    """The trainer answered 2xx with a body that is not the route's wire model."""


def endpoint(pod_ip: str, port: int) -> str:
    """The trainer API base URL of a pod; IPs, so no cluster DNS is needed."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}"


class TrainerClient:
    def __init__(self, metrics: OperatorMetrics, *, token: str | None, timeout: float) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(headers=self._headers, timeout=httpx.Timeout(timeout))
        self._metrics = metrics
        self._timeout = timeout

    async def close(self) -> None:
        await self._client.aclose()

    def connection(self) -> httpx.AsyncClient:
        """A client of its own for a long poll (``changes(via=...)``): closing it closes the poll's
        socket even when the poll is cancelled midway."""
        return httpx.AsyncClient(headers=self._headers, timeout=httpx.Timeout(self._timeout))

    async def _call(
        self,
        route: str,
        method: str,
        url: str,
        ok: tuple[int, ...],
        via: httpx.AsyncClient | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        try:
            response = await (via or self._client).request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            self._metrics.trainer_requests.labels(route=route, code="error").inc()
            raise TrainerUnreachable(f"{method} {url}: {exc!r}") from exc
        self._metrics.trainer_requests.labels(route=route, code=str(response.status_code)).inc()
        if response.status_code not in ok:
            try:
                error = wire.Error.model_validate_json(response.content)
            except ValidationError:
                error = wire.Error(error=response.text, field=None)
            raise TrainerError(response.status_code, f"{method} {url}: {error.error}", error.field or "")
        return response

    @staticmethod
    def _answer(model: type[Answer], response: httpx.Response) -> Answer:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            request = response.request
            raise TrainerAnswerInvalid(
                response.status_code,
                f"{request.method} {request.url}: the answer is not a {model.__name__}: {exc}",
            ) from exc

    @staticmethod
    def _adapter(base: str, namespace: str, name: str) -> str:
        return f"{base}/v1/adapters/{namespace}/{name}"

    @staticmethod
    def _body(request: BaseModel) -> dict[str, Any]:
        """A request model as JSON; unset optional fields are left out (the trainer's defaults)."""
        body: dict[str, Any] = request.model_dump(mode="json", exclude_none=True)
        return body

    async def init(self, base: str, namespace: str, name: str, body: wire.InitRequest) -> int:
        """``PUT /v1/adapters/{ns}/{name}``: 201 created or 200 same config; raises on 409/422."""
        response = await self._call(
            "init", "PUT", self._adapter(base, namespace, name), (200, 201), json=self._body(body)
        )
        self._answer(wire.AdapterState, response)
        return response.status_code

    async def state(self, base: str, namespace: str, name: str) -> wire.AdapterState | None:
        """``GET /v1/adapters/{ns}/{name}``, or None when the trainer does not know the adapter."""
        response = await self._call("state", "GET", self._adapter(base, namespace, name), (200, 404))
        if response.status_code == 404:
            return None
        return self._answer(wire.AdapterState, response)

    async def evict(self, base: str, namespace: str, name: str) -> bool:
        """``DELETE /v1/adapters/{ns}/{name}/cache``: whether an entry was evicted (idempotent)."""
        response = await self._call(
            "evict", "DELETE", self._adapter(base, namespace, name) + "/cache", (200,)
        )
        return self._answer(wire.Evicted, response).evicted

    async def delete(self, base: str, namespace: str, name: str) -> bool:
        """``DELETE /v1/adapters/{ns}/{name}``: remove stored weights and the cache entry."""
        response = await self._call("delete", "DELETE", self._adapter(base, namespace, name), (200, 404))
        return response.status_code == 200 and self._answer(wire.Deleted, response).deleted

    async def set_serving(self, base: str, body: wire.ServingRequest) -> wire.ServingState:
        """``PUT /v1/serving``: the pool's inference servers and the adapters the pod owns."""
        response = await self._call("serving", "PUT", f"{base}/v1/serving", (200,), json=self._body(body))
        return self._answer(wire.ServingState, response)

    async def unpublish(
        self, base: str, namespace: str, name: str, served_name: str | None = None
    ) -> dict[str, str]:
        """``DELETE /v1/adapters/{ns}/{name}/serving``: server -> "unloaded", "absent" or the error.
        ``served_name``: ask a pod that never published the adapter to unload that name."""
        response = await self._call(
            "unpublish",
            "DELETE",
            self._adapter(base, namespace, name) + "/serving",
            (200, 404, 405),
            params={"served_name": served_name} if served_name else None,
        )
        if response.status_code != 200:
            return {}  # a trainer from before publishing: it never loaded the adapter anywhere
        return self._answer(wire.Unpublished, response).servers

    async def changes(
        self, base: str, since: int, instance: str | None, wait: float, via: httpx.AsyncClient | None = None
    ) -> wire.Changes:
        """``GET /v1/changes``: the adapters whose state changed after ``since``, waiting up to
        ``wait`` seconds for one (the request's timeout is that plus the usual one)."""
        params: dict[str, str | int | float] = {"since": since, "wait": wait}
        if instance is not None:
            params["instance"] = instance
        timeout = httpx.Timeout(self._timeout + wait)
        response = await self._call(
            "changes", "GET", f"{base}/v1/changes", (200,), params=params, timeout=timeout
        )
        return self._answer(wire.Changes, response)

    async def cache(self, base: str) -> wire.CacheState:
        """``GET /v1/cache``: capacity, used bytes and entries of the pod's cache."""
        response = await self._call("cache", "GET", f"{base}/v1/cache", (200,))
        return self._answer(wire.CacheState, response)
