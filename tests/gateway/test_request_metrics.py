"""``lorafleet_gateway_requests_total`` counts an answer the app did not mean to give, too.

An exception no handler takes leaves the app as a 500; the count must see it (the feedback alert
watches 5xx answers), labelled like any other request.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.testclient import TestClient

from lorafleet_gateway.app import build, create_app
from lorafleet_gateway.directory import Adapter, StaticDirectory
from lorafleet_gateway.settings import GatewaySettings


class Broken(StaticDirectory):
    async def adapters(self) -> Sequence[Adapter]:
        raise RuntimeError("the directory broke")


def test_an_unhandled_exception_is_counted_as_a_500_of_its_route() -> None:
    gateway = build(GatewaySettings(), Broken([]))
    with TestClient(create_app(gateway), raise_server_exceptions=False) as client:
        chat = {"model": "alice", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=chat).status_code == 500
        assert client.post("/v1/chat/completions", json={"model": ""}).status_code == 422
    value = gateway.metrics.registry.get_sample_value
    labels = {"route": "/v1/chat/completions", "model": ""}
    assert value("lorafleet_gateway_requests_total", {**labels, "code": "500"}) == 1.0
    assert value("lorafleet_gateway_requests_total", {**labels, "code": "422"}) == 1.0
