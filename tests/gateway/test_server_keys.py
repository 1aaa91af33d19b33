"""Chats reach inference servers that require an API key (``vllm serve --api-key``).

The directory turns a pool's ``spec.serving.apiKeySecretRef`` and the Secret it names into the key
its adapters' servers require, or into why there is none. The gateway's real app, on a real HTTP
server, routes chats to a vLLM stand-in that refuses any other key: it sends the pool's key, never
the client's own token, and answers by name when the key is missing or refused. The adapter's
trainer is a small HTTP server answering its state in the trainer's wire model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests import json_http
from tests.gateway import live_gateway
from tests.trainer.stand_in_vllm import StandIn

from lorafleet_api import adapters, wire
from lorafleet_gateway import directory
from lorafleet_gateway.directory import Adapter, ServerKey

SECRET = "key 'api-key' of Secret team-a/vllm-key"
CHAT = {"model": "alice", "messages": [{"role": "user", "content": "hi"}]}


# ---- the directory: a pool's Secret becomes its servers' key -----------------------------------


def _bodies(ref: dict[str, str] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    serving: dict[str, Any] = {"selector": {"matchLabels": {"app": "vllm"}}}
    if ref is not None:
        serving["apiKeySecretRef"] = ref
    pool = {"metadata": {"namespace": "team-a", "name": "p"}, "spec": {"baseModel": "x", "serving": serving}}
    adapter = {
        "metadata": {"namespace": "team-a", "name": "alice"},
        "spec": {"pool": "p"},
        "status": {"phase": "Ready", "endpoint": "http://10.0.0.9:8080"},
    }
    return [adapter], [pool]


def _key(ref: dict[str, str] | None, secrets: dict[tuple[str, str], Any]) -> ServerKey | None:
    adapter_bodies, pool_bodies = _bodies(ref)
    (found,) = directory.assemble(adapter_bodies, pool_bodies, {}, secrets)
    return found.server_key


def test_the_pools_secret_gives_its_adapters_the_key_and_names_what_is_missing() -> None:
    ref = {"name": "vllm-key", "key": "api-key"}
    key = _key(ref, {("team-a", "vllm-key"): {"api-key": "k-1\n"}})
    assert key is not None and key.value == "k-1" and key.problem is None
    assert "k-1" not in repr(key)  # the key never shows in a log line of the adapter
    assert _key(None, {}) is None  # servers without a key
    absent = _key(ref, {("team-a", "vllm-key"): "does not exist: there is no such Secret"})
    assert absent is not None and absent.value is None
    assert absent.problem == f"{SECRET} does not exist: there is no such Secret"
    no_such_key = _key(ref, {("team-a", "vllm-key"): {"token": "k-1"}})
    assert (
        no_such_key is not None
        and no_such_key.problem == f"{SECRET} does not exist: the Secret has no such key"
    )
    empty = _key(ref, {("team-a", "vllm-key"): {"api-key": " "}})
    assert empty is not None and empty.problem == f"{SECRET} is empty"
    defaulted = _key({"name": "vllm-key"}, {("team-a", "vllm-key"): {"token": "k-1"}})
    assert defaulted is not None and defaulted.value == "k-1"  # the key defaults to "token"


# ---- the gateway routes chats with the key -----------------------------------------------------


class _Trainer(ThreadingHTTPServer):
    """Answers alice's state: version 1, served by vllm-0."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TrainerHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _TrainerHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state = wire.AdapterState(
            namespace="team-a",
            name="alice",
            version=1,
            epoch=1,
            lora=adapters.Lora(),
            cached=True,
            cache_bytes=1,
            artifact="team-a/.alice.v00000001",
            served_name="alice",
            durable_version=1,
            durable_error=None,
            served=[wire.ServedVersion(server="vllm-0", version=1, error=None, since=None)],
        )
        found = self.path == "/v1/adapters/team-a/alice"
        data = state.model_dump_json().encode() if found else b'{"error": "not found"}'
        json_http.answer(self, 200 if found else 404, data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def trainer() -> Iterator[_Trainer]:
    running = _Trainer()
    yield running
    running.shutdown()
    running.server_close()


@pytest.fixture
def server() -> Iterator[StandIn]:
    stand_in = StandIn(api_key="k-1")
    stand_in.loaded["alice"] = "/store/team-a/.alice.v00000001"
    yield stand_in
    stand_in.stop()


def _gateway(trainer: _Trainer, server: StandIn, key: ServerKey | None, tokens: Path) -> Any:
    alice = Adapter("team-a", "alice", "alice", trainer.url, {"vllm-0": server.url}, key)
    return live_gateway.serving([alice], tokens_file=tokens, latest_wait_seconds=0)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tok-a": ["team-a"]}))
    return path


def _chat(url: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={**CHAT, **extra},
        headers={"Authorization": "Bearer tok-a"},
        timeout=60,
    )


def _chat_authorizations(server: StandIn) -> list[str | None]:
    return [given for path, given in server.authorizations if path == "/v1/chat/completions"]


def test_chats_carry_the_servers_key_and_never_the_clients_token(
    trainer: _Trainer, server: StandIn, tokens: Path
) -> None:
    key = ServerKey(SECRET, value="k-1")
    with _gateway(trainer, server, key, tokens) as (url, _):
        answer = _chat(url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "hello"
        streamed = _chat(url, stream=True)  # the streaming path sends it too
        assert streamed.status_code == 200, streamed.text
    assert _chat_authorizations(server) == ["Bearer k-1", "Bearer k-1"]


def test_a_missing_key_is_answered_by_name_and_nothing_reaches_the_server(
    trainer: _Trainer, server: StandIn, tokens: Path
) -> None:
    key = ServerKey(SECRET, problem=f"{SECRET} does not exist: there is no such Secret")
    with _gateway(trainer, server, key, tokens) as (url, _):
        answer = _chat(url)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert "require an API key" in error and "apiKeySecretRef" in error
    assert f"{SECRET} does not exist: there is no such Secret" in error
    assert _chat_authorizations(server) == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_key_is_the_gateways_not_the_clients(
    trainer: _Trainer, server: StandIn, tokens: Path, stream: bool
) -> None:
    server.api_key = "k-2"  # rotated on the server, not yet in the Secret the gateway read
    with _gateway(trainer, server, ServerKey(SECRET, value="k-1"), tokens) as (url, _):
        answer = _chat(url, stream=stream)
    assert answer.status_code == 502  # not 401: the client's own token was fine
    error = answer.json()["error"]
    assert "vllm-0" in error and f"refused the gateway's API key, the {SECRET}" in error
    assert "k-1" not in error and "k-2" not in error


def test_a_server_that_requires_a_key_the_pool_does_not_name_says_so(
    trainer: _Trainer, server: StandIn, tokens: Path
) -> None:
    with _gateway(trainer, server, None, tokens) as (url, _):
        answer = _chat(url)
    assert answer.status_code == 502
    assert "requires an API key" in answer.json()["error"]
    assert _chat_authorizations(server) == [None]  # the client's token is not passed on
