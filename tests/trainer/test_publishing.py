"""The publisher against a stand-in inference server speaking vLLM's runtime LoRA API over HTTP.

The stand-in keeps what is loaded by name and path, as vLLM does, and can be told to refuse loads,
to stop answering, to forget everything (a restart), or to hold a load until the test releases it.
The end-to-end test with a real vLLM is tests/serving/test_serving_loop.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lorafleet_local.polling import eventually
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.publishing import Publisher, PublishObserver, Server

ALICE = AdapterId("team-a", "alice")


class StandIn:
    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse: str | None = None  # a load answers 400 with this message
        self.gate: threading.Event | None = None  # a load waits for it
        self.loading = threading.Event()  # a load has arrived
        self.answered = threading.Event()  # a load has been answered
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with stand_in.lock:
                    cards = [{"id": n, "root": p, "parent": "base"} for n, p in stand_in.loaded.items()]
                self._answer(200, {"data": [{"id": "base", "root": "/m", "parent": None}, *cards]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.calls.append((self.path, body))
                name = body["lora_name"]
                if self.path == "/v1/unload_lora_adapter":
                    with stand_in.lock:
                        found = stand_in.loaded.pop(name, None)
                    self._answer(200 if found else 404, {"message": "ok" if found else "not found"})
                    return
                stand_in.loading.set()
                if stand_in.gate is not None:
                    stand_in.gate.wait(30)
                try:
                    self._load(name, body)
                finally:
                    stand_in.answered.set()

            def _load(self, name: str, body: dict[str, Any]) -> None:
                if stand_in.refuse:
                    self._answer(400, {"error": {"message": stand_in.refuse}})
                    return
                with stand_in.lock:
                    if name in stand_in.loaded and not body.get("load_inplace"):
                        self._answer(400, {"error": {"message": "already loaded"}})
                        return
                    stand_in.loaded[name] = body["lora_path"]
                self._answer(200, "Success")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def loads(self) -> list[dict[str, Any]]:
        return [b for path, b in self.calls if path == "/v1/load_lora_adapter"]

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[StandIn]:
    stand_in = StandIn()
    yield stand_in
    stand_in.stop()


class Seen:
    def __init__(self) -> None:
        self.published: list[float] = []
        self.failed: list[str] = []

    def observer(self) -> PublishObserver:
        return PublishObserver(published=self.published.append, failed=self.failed.append)


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def publisher(seen: Seen) -> Iterator[Publisher]:
    pub = Publisher(seen.observer(), resync_seconds=0.1)
    yield pub
    pub.close()


def _served(publisher: Publisher, version: int) -> bool:
    states = publisher.state(ALICE)
    assert states and all(s["version"] == version and s["error"] is None for s in states), states
    return True


def test_each_commit_is_loaded_and_the_next_one_in_place(
    publisher: Publisher, server: StandIn, seen: Seen
) -> None:
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 0, "/store/team-a/.alice.v00000000")
    eventually("version 0 served", lambda: _served(publisher, 0), timeout=10, interval=0.02)
    publisher.committed(ALICE, 1, "/store/team-a/.alice.v00000001")
    eventually("version 1 served", lambda: _served(publisher, 1), timeout=10, interval=0.02)
    assert server.loaded == {"alice": "/store/team-a/.alice.v00000001"}
    first, second = server.loads()
    assert "load_inplace" not in first and second["load_inplace"] is True
    assert len(seen.published) == 2 and not seen.failed
    assert publisher.lag() == (0, 0.0)


def test_commits_of_an_adapter_this_pod_does_not_own_are_not_published(
    publisher: Publisher, server: StandIn
) -> None:
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.committed(ALICE, 1, "/store/x")
    assert publisher.state(ALICE) == []
    assert publisher.served_name(ALICE) is None


def _park_a_load(publisher: Publisher, server: StandIn) -> threading.Event:
    """alice version 1 owned and its load held by the server until the returned gate is set."""
    gate = server.gate = threading.Event()
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 1, "/v1")
    assert server.loading.wait(10)
    return gate


def test_versions_committed_during_a_load_coalesce_into_the_newest(
    publisher: Publisher, server: StandIn
) -> None:
    gate = _park_a_load(publisher, server)
    assert publisher.held_versions(ALICE) == {1}  # storage keeps version 1 while it loads
    for version in (2, 3, 4):
        publisher.committed(ALICE, version, f"/v{version}")
    gate.set()
    eventually("version 4 served", lambda: _served(publisher, 4), timeout=10, interval=0.02)
    assert [b["lora_path"] for b in server.loads()] == ["/v1", "/v4"]
    assert publisher.held_versions(ALICE) == set()


def test_a_restarted_server_gets_the_adapter_again(publisher: Publisher, server: StandIn) -> None:
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 2, "/v2")
    eventually("served", lambda: _served(publisher, 2), timeout=10, interval=0.02)
    with server.lock:
        server.loaded.clear()  # what a restarted server lists
    eventually("loaded again", lambda: server.loaded == {"alice": "/v2"}, timeout=10, interval=0.02)
    assert len(server.loads()) == 2


def test_a_refused_load_is_reported_and_retried_until_it_succeeds(
    publisher: Publisher, server: StandIn, seen: Seen
) -> None:
    server.refuse = "LoRA rank 32 is greater than max_lora_rank 16"
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 1, "/v1")

    def refused() -> bool:
        (state,) = publisher.state(ALICE)
        assert state["version"] is None and "max_lora_rank 16" in (state["error"] or ""), state
        return True

    eventually("the refusal reported", refused, timeout=10, interval=0.02)
    assert "refused" in seen.failed
    assert publisher.lag()[0] == 2  # versions 0 and 1: none served
    server.refuse = None
    eventually("served after the backoff", lambda: _served(publisher, 1), timeout=20, interval=0.05)


def test_an_unreachable_server_is_reported_and_served_once_back(publisher: Publisher, seen: Seen) -> None:
    gone = StandIn()
    url = gone.url
    gone.stop()
    publisher.set_servers([Server("vllm-0", url)])
    publisher.own(ALICE, "alice", 1, "/v1")

    def unreachable() -> bool:
        (state,) = publisher.state(ALICE)
        assert state["error"] and url in state["error"], state
        return True

    eventually("unreachable reported", unreachable, timeout=10, interval=0.02)
    assert "unreachable" in seen.failed
    publisher.set_servers([])
    assert publisher.state(ALICE) == []


def test_disowning_unloads_from_every_server_and_says_so(publisher: Publisher, server: StandIn) -> None:
    other = StandIn()
    try:
        publisher.set_servers([Server("vllm-0", server.url), Server("vllm-1", other.url)])
        publisher.own(ALICE, "alice", 1, "/v1")
        eventually(
            "served on both", lambda: _served(publisher, 1) and len(publisher.state(ALICE)) == 2, timeout=10
        )
        with other.lock:
            other.loaded.clear()  # already gone there
        assert publisher.disown(ALICE) in (
            {"vllm-0": "unloaded", "vllm-1": "absent"},
            {"vllm-0": "unloaded", "vllm-1": "unloaded"},  # reloaded there before the unload ran
        )
        assert server.loaded == {} and other.loaded == {}
        assert publisher.state(ALICE) == []
        assert publisher.disown(ALICE) == {}
    finally:
        other.stop()


def test_dropping_a_server_does_not_wait_for_its_load_in_flight(
    publisher: Publisher, server: StandIn
) -> None:
    gate = _park_a_load(publisher, server)
    publisher.set_servers([])  # returns while the server still holds the load
    assert not server.answered.is_set() and publisher.servers == []
    assert publisher.state(ALICE) == []
    gate.set()
