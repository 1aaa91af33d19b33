"""Fixtures of the operator's handler tests: kmock as the API server, real trainer-shaped HTTP servers.

- ``cluster``: kmock's KubernetesEmulator with the discovery kopf needs (our two resources with a
  status subresource, pods, services, events, namespaces, CRDs, leases).
- ``trainers``: the recording trainer app (tests/operator/harness.py) on 127.0.0.10.. (one address
  per pod ordinal, one port): the other side of the operator's real HTTP client, not a mock of it.
- ``kubelet``: marks new pods Running and Ready with their ordinal's IP.
- ``operator``: runs the whole kopf operator with LoraFleet's handlers in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from tests.operator.harness import (
    ADAPTERS,
    EVENTS,
    MAX_PODS,
    PODS,
    POOLS,
    SERVICES,
    TOKEN,
    Kubelet,
    Trainers,
    ip_of,
    trainer_app,
)

from lorafleet_local.processes import free_port
from lorafleet_operator import handlers, kube
from lorafleet_operator.kube import KubeApi
from lorafleet_operator.metrics import OperatorMetrics
from lorafleet_operator.runtime import Runtime
from lorafleet_operator.settings import OperatorSettings
from lorafleet_operator.trainers import TrainerClient


@pytest.fixture
async def trainers() -> AsyncIterator[Trainers]:
    state = Trainers(port=free_port())
    runner = web.AppRunner(trainer_app(state), access_log=None)
    await runner.setup()
    for ordinal in range(MAX_PODS):
        await web.TCPSite(runner, ip_of(ordinal), state.port).start()
    yield state
    await runner.cleanup()


RV = "/metadata/resourceVersion"


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus two API-server behaviours kopf relies on: ``metadata.generateName``
    (kopf posts Events with it) and a ``resourceVersion`` that changes with every write (kopf
    waits for the version it wrote to come back through the watch before acting again)."""

    versions = itertools.count(1000)

    async def _handle(self, request: kmock.Request) -> web.StreamResponse:
        data = request.data
        version = str(next(self.versions))
        if request.method == kmock.method.PUT and request.resource is not None and request.name:
            return self._replace(request, version)
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            meta["resourceVersion"] = version
        elif request.action == kmock.action.UPDATE and isinstance(data, dict):
            data.setdefault("metadata", {})["resourceVersion"] = version
        elif request.action == kmock.action.UPDATE and isinstance(data, list):
            # kmock answers a failed JSON-patch "test" with 500 (a real server: 409, and kopf
            # re-reads); without that recovery a stale test would block kopf forever, so the
            # optimistic-concurrency check is left to the e2e tests on a real API server.
            data[:] = [op for op in data if not (op.get("op") == "test" and op.get("path") == RV)]
            data.append({"op": "replace", "path": RV, "value": version})
        return await super()._handle(request)

    def _replace(self, request: kmock.Request, version: str) -> web.StreamResponse:
        """PUT (kmock has none), with the API server's optimistic concurrency: 409 on a stale
        resourceVersion. Used for Leases only, which nothing watches, so no watch event is sent."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return web.json_response({"kind": "Status", "code": 404, "message": "not found"}, status=404)
        stored = self.objects[key].raw.get("metadata", {}).get("resourceVersion")
        sent = (request.data.get("metadata") or {}).get("resourceVersion")
        if sent != stored:
            message = f"the object has been modified ({sent} != {stored})"
            return web.json_response({"kind": "Status", "code": 409, "message": message}, status=409)
        body = dict(request.data)
        body["metadata"] = {**body["metadata"], "resourceVersion": version}
        self.objects[key] = body
        return web.json_response(body)


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with Emulator() as handler, kmock.Server(handler):
        _declare(handler)
        yield handler


@pytest.fixture
async def cluster() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with emulator() as handler:
        yield handler


@pytest.fixture
def spare_cluster() -> Callable[[], contextlib.AbstractAsyncContextManager[kmock.KubernetesEmulator]]:
    """Another emulator, for a test that moves the cluster's state to a fresh API server."""
    return emulator


def _declare(kmock: kmock.KubernetesEmulator) -> None:
    verbs = {"list", "watch", "get", "create", "patch", "update", "delete"}
    kmock.resources[POOLS] = kmock.ResourceInfo(
        kind="TrainerPool", namespaced=True, verbs=verbs, subresources={"status"}
    )
    kmock.resources[ADAPTERS] = kmock.ResourceInfo(
        kind="LoraAdapter", namespaced=True, verbs=verbs, subresources={"status"}
    )
    kmock.resources[PODS] = kmock.ResourceInfo(
        kind="Pod", namespaced=True, verbs=verbs, subresources={"status"}
    )
    kmock.resources[SERVICES] = kmock.ResourceInfo(kind="Service", namespaced=True, verbs=verbs)
    kmock.resources[EVENTS] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=verbs)
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs
    )
    kmock.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
        kind="Lease", namespaced=True, verbs=verbs
    )


@pytest.fixture
async def kubelet(cluster: kmock.KubernetesEmulator) -> AsyncIterator[Kubelet]:
    kubelet = Kubelet(cluster)
    task = asyncio.create_task(kubelet.run())
    yield kubelet
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def settings(trainers: Trainers, tmp_path: Path, request: pytest.FixtureRequest) -> OperatorSettings:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    marker = request.node.get_closest_marker("operator_settings")
    changed = marker.kwargs if marker is not None else {}
    return OperatorSettings(
        trainer_port=trainers.port,
        resync_seconds=2.0,
        replace_grace_seconds=1.0,
        eviction_timeout_seconds=1.5,
        pending_backoff_seconds=0.2,
        pending_backoff_max_seconds=0.5,
        trainer_timeout_seconds=2.0,
        api_timeout_seconds=2.0,
        auth_token_file=token_file,
        leader_election=False,
    ).model_copy(update=changed)


OperatorStarter = Callable[..., contextlib.AbstractAsyncContextManager[Runtime]]


def _serves_a_connection(task: asyncio.Task[Any]) -> bool:
    """An aiohttp server's connection handler in this loop (kmock's API, the trainers' app)."""
    return getattr(task.get_coro(), "__qualname__", "") == "RequestHandler.start"


class _NotTheOperators(Collection[asyncio.Task[Any]]):
    """The tasks kopf must not wait for when it stops (``kopf.run_tasks(ignored=...)``).

    At its stop kopf waits up to 5 s for every task of the loop started after it, then cancels
    them: that would include the fixture's own teardown (which waits for kopf: 5 s every test)
    and the in-loop servers' connection handlers, which wait on streams no client reads any more.
    Ignored: the tasks that existed before the operator, the teardown and those handlers (the
    teardown cancels them once kopf is done). kopf still waits for its own handlers."""

    def __init__(self, existing: set[asyncio.Task[Any]]) -> None:
        self.existing = existing
        self.teardown: set[asyncio.Task[Any]] = set()

    def __contains__(self, task: object) -> bool:
        if not isinstance(task, asyncio.Task):
            return False
        return task in self.existing or task in self.teardown or _serves_a_connection(task)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(self.existing | self.teardown)

    def __len__(self) -> int:
        return len(self.existing | self.teardown)


@pytest.fixture
def start_operator(
    cluster: kmock.KubernetesEmulator,
    kubelet: Kubelet,
    settings: OperatorSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> OperatorStarter:
    """Starts a whole operator (fresh registry, clients and memory) each time it is entered,
    against ``cluster`` or another emulator passed as ``api``."""
    kubeconfig = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    @contextlib.asynccontextmanager
    async def started(api: kmock.KubernetesEmulator | None = None) -> AsyncIterator[Runtime]:
        server = str((api or cluster).url).rstrip("/")
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": server}}],
                    "users": [{"name": "test", "user": {"token": "kube-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                    "current-context": "kmock",
                }
            ),
            encoding="utf-8",
        )
        metrics = OperatorMetrics(CollectorRegistry())
        rt = Runtime(
            settings,
            KubeApi(kube.connect(), timeout=settings.api_timeout_seconds),
            TrainerClient(metrics, token=settings.auth_token(), timeout=settings.trainer_timeout_seconds),
            metrics,
        )
        registry = kopf.OperatorRegistry()
        handlers.register(registry, settings)

        @kopf.on.startup(registry=registry)
        def quick_exit(settings: kopf.OperatorSettings, **_: object) -> None:
            # Tests stop the operator after every scenario; do not linger over idle workers.
            settings.queueing.exit_timeout = 0.5
            settings.queueing.idle_timeout = 0.5
            settings.background.instant_exit_timeout = 0.1

        stop, ready = asyncio.Event(), asyncio.Event()
        # kopf.operator() is spawn_tasks + run_tasks; run apart so that run_tasks is told which
        # tasks are not the operator's (see _NotTheOperators).
        ignored = _NotTheOperators(asyncio.all_tasks())
        root_tasks = await kopf.spawn_tasks(
            registry=registry,
            standalone=True,
            clusterwide=True,
            memo=kopf.Memo(runtime=rt),
            stop_flag=stop,
            ready_flag=ready,
        )
        task = asyncio.create_task(kopf.run_tasks(root_tasks, ignored=ignored))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            yield rt
        finally:
            current = asyncio.current_task()
            if current is not None:
                ignored.teardown.add(current)
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
            for other in asyncio.all_tasks():
                if _serves_a_connection(other):
                    other.cancel()  # what kopf did to them after its 5 s
            await rt.close()

    return started


@pytest.fixture
async def operator(start_operator: OperatorStarter) -> AsyncIterator[Runtime]:
    async with start_operator() as rt:
        yield rt
