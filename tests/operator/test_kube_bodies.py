"""What KubeApi sends: the builders' dicts reach the API server whole, and status as a merge patch."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client
from tests.operator.harness import pool_manifest

from lorafleet_api import pools
from lorafleet_operator import building, kube
from lorafleet_operator.settings import OperatorSettings


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append({"method": request.method, "type": request.content_type, "body": await request.json()})
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_a_gpu_pod_is_sent_as_built(recorder: tuple[str, list[dict[str, Any]]]) -> None:
    server, seen = recorder
    pool = pools.parse(pool_manifest(gpu=True))
    pod = building.build_pod(pool, 0, OperatorSettings())
    api = kube.KubeApi(client.Configuration(host=server))
    try:
        assert await api.create_pod(pod)
    finally:
        await api.close()
    (sent,) = seen
    # Integer quantities too, which the client's typed V1Pod model would refuse.
    assert sent["body"]["spec"]["containers"][0]["resources"]["limits"][building.GPU_RESOURCE] == 1
    assert sent == {"method": "POST", "type": "application/json", "body": json.loads(json.dumps(pod))}


async def test_status_is_a_merge_patch(recorder: tuple[str, list[dict[str, Any]]]) -> None:
    server, seen = recorder
    api = kube.KubeApi(client.Configuration(host=server))
    try:
        await api.patch_adapter_status("ns", "a", {"phase": "Ready"})
    finally:
        await api.close()
    assert seen == [{"method": "PATCH", "type": kube.MERGE_PATCH, "body": {"status": {"phase": "Ready"}}}]
