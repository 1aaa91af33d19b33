"""Helpers of the operator's handler tests: a recording trainer app, a kubelet stand-in, manifests.

The trainer app is a real aiohttp server that answers the trainer API with the trainer's own wire
models (``lorafleet_api.wire``) and records every call with the address it arrived on, so tests see
which pod got which request. The
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
from pydantic import BaseModel, ValidationError

from lorafleet_api import adapters, wire
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
SINCE = "2026-01-01T00:00:00Z"  # when the fake trainers say a server's version last changed


def ip_of(ordinal: int) -> str:
    return f"127.0.0.{BASE_IP + ordinal}"


@dataclasses.dataclass
class Call:
    ip: str
    method: str
    path: str
    body: Any
    auth: str | None
    query: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stored:
    """One adapter in a fake trainer's store, as the real trainer would hold it."""

    lora: adapters.Lora
    epoch: int
    version: int = 0
    cached: bool = False  # the real trainer caches an adapter at its first step, not at init
    cache_bytes: int = 0


@dataclasses.dataclass
class Trainers:
    """The recording trainer servers: their calls, their per-pod state, and switches for failures.

    They answer with the trainer's own wire models (``lorafleet_api.wire``), so a field the operator
    reads that the trainer no longer sends fails these tests too."""

    port: int
    calls: list[Call] = dataclasses.field(default_factory=list)
    adapters: dict[str, dict[tuple[str, str], Stored]] = dataclasses.field(default_factory=dict)  # by IP
    failing: set[str] = dataclasses.field(default_factory=set)  # IPs answering 503 to everything
    # What each pod was told by PUT /v1/serving: its servers and its adapters' served names.
    serving: dict[str, wire.ServingRequest] = dataclasses.field(default_factory=dict)
    refusing: dict[str, str] = dataclasses.field(default_factory=dict)  # server name -> its load error
    dropping: set[str] = dataclasses.field(default_factory=set)  # fields left out of state answers
    # GET /v1/changes: per pod, the adapter each change was to, in order (inits and train() add).
    change_log: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    quiet: set[str] = dataclasses.field(default_factory=set)  # IPs without the changes route (404)

    def of(self, method: str, suffix: str = "") -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.endswith(suffix)]

    def inits(self, name: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == "PUT" and (name is None or c.path == f"/v1/adapters/{NS}/{name}")
        ]

    def train(self, ip: str, name: str, version: int, cache_bytes: int = 1000) -> None:
        """What a distill step does to the adapter's state: a new version, cached."""
        entry = self.adapters[ip][(NS, name)]
        entry.version, entry.cached, entry.cache_bytes = version, True, cache_bytes
        self.change_log.setdefault(ip, []).append((NS, name))

    def state(self, ip: str, key: tuple[str, str]) -> wire.AdapterState:
        entry = self.adapters[ip][key]
        served_name, served = None, []
        told = self.serving.get(ip)
        owned = {(a.namespace, a.name): a.served_name for a in told.adapters} if told else {}
        if key in owned and told is not None:
            served_name = owned[key]
            served = [
                wire.ServedVersion(
                    server=s.name,
                    version=None if s.name in self.refusing else entry.version,
                    error=self.refusing.get(s.name),
                    since=SINCE,
                )
                for s in told.servers
            ]
        return wire.AdapterState(
            namespace=key[0],
            name=key[1],
            version=entry.version,
            epoch=entry.epoch,
            lora=entry.lora,
            cached=entry.cached,
            cache_bytes=entry.cache_bytes,
            artifact=f"{key[0]}/.{key[1]}.v{entry.version:08d}",
            durable_version=entry.version,
            durable_error=None,
            served_name=served_name,
            served=served,
        )

    def answer(self, ip: str, key: tuple[str, str]) -> dict[str, Any]:
        """The adapter's state as the pod sends it, less the fields ``dropping`` names (a trainer
        that does not send what the wire model requires)."""
        body = self.state(ip, key).model_dump(mode="json")
        for name in self.dropping:
            body.pop(name, None)
        return body


def adapter_state(version: int = 0, cached: bool = False, **fields: Any) -> wire.AdapterState:
    """A trainer's answer for team-a/alice, as the pure outcome tests feed it."""
    values: dict[str, Any] = {
        "namespace": NS,
        "name": "alice",
        "epoch": 1,
        "lora": adapters.Lora(),
        "cache_bytes": 1000 if cached else 0,
        "artifact": f"{NS}/.alice.v{version:08d}",
        "durable_version": version,
        "durable_error": None,
        "served_name": None,
        "served": [],
        **fields,
    }
    return wire.AdapterState(version=version, cached=cached, **values)


def _same_shape(a: adapters.Lora, b: adapters.Lora) -> bool:
    """The trainer's test of one LoRA config: module order is irrelevant (``LoraSpec.shape_key``)."""
    return (a.rank, a.alpha, a.dropout, sorted(a.target_modules)) == (
        b.rank,
        b.alpha,
        b.dropout,
        sorted(b.target_modules),
    )


def _answer(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    text = f"{field}: {message}" if field else message
    return _answer(wire.Error(error=text, field=field), status)


def trainer_app(state: Trainers) -> web.Application:
    async def record(request: web.Request) -> tuple[str, Any]:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else "?"
        body = await request.json() if request.can_read_body else None
        auth = request.headers.get("Authorization")
        state.calls.append(Call(ip, request.method, request.path, body, auth, dict(request.query)))
        return ip, body

    def key(request: web.Request) -> tuple[str, str]:
        return request.match_info["ns"], request.match_info["name"]

    def guard(ip: str, request: web.Request) -> web.Response | None:
        if ip in state.failing:
            return _error(503, "the base model is not loaded yet")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(401, "bearer token required", "Authorization")
        return None

    async def init(request: web.Request) -> web.Response:
        ip, body = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        try:
            asked = wire.InitRequest.model_validate(body)
        except ValidationError as exc:
            return _error(422, str(exc), "body")
        known = state.adapters.setdefault(ip, {})
        previous = known.get(key(request))
        if previous is not None and not _same_shape(previous.lora, asked.lora):
            return _error(409, "differs from the stored adapter's", "lora")
        if previous is not None and asked.epoch < previous.epoch:
            return _error(409, f"{asked.epoch} is older than the adapter's epoch {previous.epoch}", "epoch")
        if previous is None:
            known[key(request)] = Stored(asked.lora, asked.epoch)
        elif asked.epoch > previous.epoch:  # a new placement: the cached state of the old one goes
            previous.epoch, previous.cached, previous.cache_bytes = asked.epoch, False, 0
        state.change_log.setdefault(ip, []).append(key(request))
        return _answer(state.state(ip, key(request)), 200 if previous else 201)

    async def changes(request: web.Request) -> web.Response:
        # Not recorded in calls: the operator keeps one open per Ready pod all the time.
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else "?"
        if (refusal := guard(ip, request)) is not None:
            return refusal
        if ip in state.quiet:
            return _error(404, "Not Found", "path")
        instance, log = f"fake-{ip}", state.change_log.setdefault(ip, [])
        if request.query.get("instance") != instance:
            return web.json_response({"instance": instance, "seq": len(log), "adapters": []})
        since = int(request.query.get("since", "0"))
        # The real trainer waits up to `wait` for a change; a second keeps test teardowns short.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(float(request.query.get("wait", "0")), 1.0)
        while len(log) <= since and loop.time() < deadline:
            await asyncio.sleep(0.02)
        seq, answers = len(log), []
        for changed in dict.fromkeys(log[since:]):
            if changed in state.adapters.get(ip, {}):
                answers.append(state.answer(ip, changed))
        return web.json_response({"instance": instance, "seq": seq, "adapters": answers})

    async def get_state(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        if key(request) not in state.adapters.get(ip, {}):
            return _error(404, "no stored adapter has this id", "adapter")
        return web.json_response(state.answer(ip, key(request)))

    async def evict(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        entry = state.adapters.get(ip, {}).get(key(request))
        evicted = entry is not None and entry.cached
        if entry is not None:  # the stored adapter stays; only its cache entry goes
            entry.cached, entry.cache_bytes = False, 0
        return _answer(wire.Evicted(evicted=evicted))

    async def delete(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        gone = state.adapters.get(ip, {}).pop(key(request), None)
        return _answer(wire.Deleted(deleted=gone is not None))

    async def cache(request: web.Request) -> web.Response:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else "?"
        if (refusal := guard(ip, request)) is not None:
            return refusal
        held = [(k, e) for k, e in state.adapters.get(ip, {}).items() if e.cached]
        entries = [
            wire.CacheEntry(adapter=f"{k[0]}/{k[1]}", bytes=e.cache_bytes, pinned=False, version=e.version)
            for k, e in held
        ]
        used = sum(e.cache_bytes for _, e in held)
        return _answer(wire.CacheState(capacity_bytes=10**9, used_bytes=used, entries=entries))

    async def set_serving(request: web.Request) -> web.Response:
        ip, body = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        told = wire.ServingRequest.model_validate(body)
        state.serving[ip] = told
        return _answer(
            wire.ServingState(
                servers=[s.name for s in told.servers],
                adapter_root=told.adapter_root or "/var/lib/lorafleet",
                lag_versions=0,
                lag_seconds=0.0,
            )
        )

    async def unpublish(request: web.Request) -> web.Response:
        ip, _ = await record(request)
        if (refusal := guard(ip, request)) is not None:
            return refusal
        told = state.serving.get(ip)
        if told is None:
            return _answer(wire.Unpublished(servers={}))
        adapters_left = [a for a in told.adapters if (a.namespace, a.name) != key(request)]
        state.serving[ip] = told.model_copy(update={"adapters": adapters_left})
        return _answer(wire.Unpublished(servers={s.name: "unloaded" for s in told.servers}))

    app = web.Application()
    app.router.add_put("/v1/adapters/{ns}/{name}", init)
    app.router.add_get("/v1/adapters/{ns}/{name}", get_state)
    app.router.add_delete("/v1/adapters/{ns}/{name}/cache", evict)
    app.router.add_delete("/v1/adapters/{ns}/{name}/serving", unpublish)
    app.router.add_delete("/v1/adapters/{ns}/{name}", delete)
    app.router.add_get("/v1/cache", cache)
    app.router.add_put("/v1/serving", set_serving)
    app.router.add_get("/v1/changes", changes)
    return app


class Kubelet:
    """Marks new pods Running and Ready with the IP of their ordinal, as a kubelet would."""

    def __init__(self, cluster: kmock.KubernetesEmulator) -> None:
        self.cluster = cluster
        self.unready: set[str] = set()  # pod names that stay not Ready
        self.seen: dict[str, str] = {}  # pod name -> uid it was given

    async def run(self) -> None:
        while True:
            for (resource, namespace, name), obj in list(self.cluster.objects.items()):
                if str(resource) != str(kmock.resource(PODS)) or obj.deleted or name in self.unready:
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
