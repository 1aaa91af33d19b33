"""Helpers of the operator's handler tests: a recording trainer app, a kubelet stand-in, manifests.

The trainer app is a real aiohttp server that answers the trainer API as DESIGN.md describes and
records every call with the address it arrived on, so tests see which pod got which request. The
kubelet stand-in gives each new pod a uid, the IP of its ordinal and a Ready condition.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import kmock
from aiohttp import web

from lorafleet_local import polling
from lorafleet_operator import names

NS = "team-a"
TOKEN = "s3cret-token"
POOLS = "lorafleet.io/v1alpha1/trainerpools"
ADAPTERS = "lorafleet.io/v1alpha1/loraadapters"
PODS = "v1/pods"
SERVICES = "v1/services"
EVENTS = "v1/events"
BASE_IP = 10  # pod ordinal k listens on 127.0.0.(10 + k)
MAX_PODS = 6


def ip_of(ordinal: int) -> str:
    return f"127.0.0.{BASE_IP + ordinal}"


@dataclasses.dataclass
class Call:
    ip: str
    method: str
    path: str
    body: Any
    auth: str | None


@dataclasses.dataclass
class Trainers:
    """The recording trainer servers: their calls, their per-pod state, and switches for failures."""

    port: int
    calls: list[Call] = dataclasses.field(default_factory=list)
    # ip -> {(ns, name): {"lora":..., "epoch":...}}
    adapters: dict[str, dict[tuple[str, str], dict[str, Any]]] = dataclasses.field(default_factory=dict)
    failing: set[str] = dataclasses.field(default_factory=set)  # IPs answering 503 to everything

    def of(self, method: str, suffix: str = "") -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.endswith(suffix)]

    def inits(self, name: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == "PUT" and (name is None or c.path == f"/v1/adapters/{NS}/{name}")
        ]


def trainer_app(state: Trainers) -> web.Application:
    async def record(request: web.Request) -> tuple[str, Any]:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else "?"
        body = await request.json() if request.can_read_body else None
        state.calls.append(Call(ip, request.method, request.path, body, request.headers.get("Authorization")))
        return ip, body

    def key(request: web.Request) -> tuple[str, str]:
        return request.match_info["ns"], request.match_info["name"]

    def guard(ip: str, request: web.Request) -> web.Response | None:
        if ip in state.failing:
            return web.json_response({"error": "not ready"}, status=503)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "Authorization: bearer token required"}, status=401)
        return None

    async def init(request: web.Request) -> web.Response:
        ip, body = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        known = state.adapters.setdefault(ip, {})
        previous = known.get(key(request))
        if previous is not None and previous["lora"] != body["lora"]:
            return web.json_response({"error": "lora: differs from the stored adapter"}, status=409)
        if previous is not None and body["epoch"] < previous["epoch"]:
            message = f"epoch: epoch {body['epoch']} is older than the adapter's epoch {previous['epoch']}"
            return web.json_response({"error": message}, status=409)
        version = previous["version"] if previous is not None else 0
        known[key(request)] = {"lora": body["lora"], "epoch": body["epoch"], "version": version}
        return web.json_response({"epoch": body["epoch"]}, status=200 if previous else 201)

    async def get_state(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        entry = state.adapters.get(ip, {}).get(key(request))
        if entry is None:
            return web.json_response({"error": "adapter not found"}, status=404)
        return web.json_response({"version": entry["version"], "epoch": entry["epoch"], "cached": True})

    async def evict(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        return web.json_response({"evicted": state.adapters.get(ip, {}).pop(key(request), None) is not None})

    async def delete(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        return web.json_response({"deleted": state.adapters.get(ip, {}).pop(key(request), None) is not None})

    async def cache(request: web.Request) -> web.Response:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else "?"
        if (refusal := guard(ip, request)) is not None:
            return refusal
        used = 1000 * len(state.adapters.get(ip, {}))
        return web.json_response({"capacity_bytes": 10**9, "used_bytes": used, "entries": []})

    app = web.Application()
    app.router.add_put("/v1/adapters/{ns}/{name}", init)
    app.router.add_get("/v1/adapters/{ns}/{name}", get_state)
    app.router.add_delete("/v1/adapters/{ns}/{name}/cache", evict)
    app.router.add_delete("/v1/adapters/{ns}/{name}", delete)
    app.router.add_get("/v1/cache", cache)
    return app


class Kubelet:
    """Marks new pods Running and Ready with the IP of their ordinal, as a kubelet would."""

    def __init__(self, cluster: kmock.KubernetesEmulator) -> None:
        self.cluster = cluster
        self.held: set[str] = set()  # pod names that stay not Ready
        self.seen: dict[str, str] = {}  # pod name -> uid it was given

    async def run(self) -> None:
        while True:
            for (resource, namespace, name), obj in list(self.cluster.objects.items()):
                if str(resource) != str(kmock.resource(PODS)) or obj.deleted or name in self.held:
                    continue
                meta = obj.get("metadata", {})
                if meta.get("uid") and (obj.get("status") or {}).get("podIP"):
                    continue
                uid = meta.get("uid") or str(uuid.uuid4())
                self.seen[name] = uid
                ordinal = int(name.rsplit("-", 1)[1])
                await self.patch(namespace, name, {"metadata": {"uid": uid}, "status": ready_status(ordinal)})
            await asyncio.sleep(0.05)

    async def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        url = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        response = await self.cluster.request("PATCH", url, json=body)
        response.release()


def ready_status(ordinal: int, ready: bool = True) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": ip_of(ordinal),
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }


async def eventually(check: Callable[[], Any], *, timeout: float = 30.0, what: str = "") -> Any:
    """polling.eventually_async in the argument order these tests read best in."""
    return await polling.eventually_async(what or repr(check), check, timeout)


def live(cluster: kmock.KubernetesEmulator, resource: str, namespace: str = NS) -> dict[str, dict[str, Any]]:
    """The objects of ``resource`` that exist now, by name."""
    res = kmock.resource(resource)
    return {
        name: dict(obj.raw)
        for (r, ns, name), obj in list(cluster.objects.items())
        if str(r) == str(res) and ns == namespace and not obj.deleted
    }


def _metadata(name: str) -> dict[str, Any]:
    """Metadata of a custom resource as the emulator would hold it after a create."""
    return {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1, "resourceVersion": "1"}


def pool_manifest(name: str = "demo", replicas: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.POOL_KIND,
        "metadata": _metadata(name),
        "spec": {"baseModel": "builtin:tiny", "replicas": replicas, "gpu": False, **spec},
    }


def adapter_manifest(name: str, pool: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.ADAPTER_KIND,
        "metadata": _metadata(name),
        "spec": {
            "pool": pool,
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj"]},
            **spec,
        },
    }


async def create(cluster: kmock.KubernetesEmulator, resource: str, body: dict[str, Any]) -> None:
    res = kmock.resource(resource)
    prefix = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    response = await cluster.request("POST", f"{prefix}/namespaces/{NS}/{res.plural}", json=body)
    assert response.status < 300, await response.text()
    response.release()


async def delete(cluster: kmock.KubernetesEmulator, resource: str, name: str) -> None:
    res = kmock.resource(resource)
    prefix = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    response = await cluster.request("DELETE", f"{prefix}/namespaces/{NS}/{res.plural}/{name}")
    assert response.status < 300, await response.text()
    response.release()


async def patch(cluster: kmock.KubernetesEmulator, resource: str, name: str, body: dict[str, Any]) -> None:
    res = kmock.resource(resource)
    prefix = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    response = await cluster.request("PATCH", f"{prefix}/namespaces/{NS}/{res.plural}/{name}", json=body)
    assert response.status < 300, await response.text()
    response.release()
