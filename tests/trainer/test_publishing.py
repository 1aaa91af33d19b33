"""The publisher against a stand-in inference server speaking vLLM's runtime LoRA API over HTTP.

The stand-in (tests/trainer/stand_in_vllm.py) keeps what is loaded by name and path, as vLLM does,
and can be told to refuse loads, to stop answering, to forget everything (a restart), to hold a
load until the test releases it, or to require an API key. The tests of the service (with a
stand-in engine) check that what ``PUT /v1/serving``, init and the trainer's settings say reaches
the publisher. The end-to-end test with a real vLLM is tests/serving/test_serving_loop.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path, PurePosixPath
from typing import cast

import pytest
from tests.trainer.stand_in_vllm import StandIn

from lorafleet_api import wire
from lorafleet_local.polling import eventually
from lorafleet_trainer.app import create_app
from lorafleet_trainer.errors import AdapterNotFound
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.results import AdapterRecord, EngineStats, InitResult
from lorafleet_trainer.service.publishing import Publisher, PublishObserver, Server, ServerClient
from lorafleet_trainer.service.server_keys import ServerKey
from lorafleet_trainer.service.serving import Engine, TrainerService
from lorafleet_trainer.settings import TrainerSettings

ALICE = AdapterId("team-a", "alice")
BOB = AdapterId("team-a", "bob")
STORE = "/store"  # the trainer's own store root


def artifact(adapter: AdapterId, version: int) -> str:
    """A version's directory relative to the store, as storage names it."""
    return f"{adapter.namespace}/.{adapter.name}.v{version:08d}"


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
    pub = Publisher(seen.observer(), store_root=STORE, resync_seconds=0.1)
    yield pub
    pub.close()


def _served(publisher: Publisher, version: int, adapter: AdapterId = ALICE) -> bool:
    states = publisher.state(adapter)
    assert states and all(s["version"] == version and s["error"] is None for s in states), states
    return True


def test_each_commit_is_loaded_and_the_next_one_in_place(
    publisher: Publisher, server: StandIn, seen: Seen
) -> None:
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 0, artifact(ALICE, 0))
    eventually("version 0 served", lambda: _served(publisher, 0), timeout=10, interval=0.02)
    publisher.committed(ALICE, 1, artifact(ALICE, 1))
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
    publisher.committed(ALICE, 1, artifact(ALICE, 1))
    assert publisher.state(ALICE) == []
    assert publisher.served_name(ALICE) is None


def _park_a_load(publisher: Publisher, server: StandIn) -> threading.Event:
    """alice version 1 owned and its load held by the server until the returned gate is set."""
    gate = server.gate = threading.Event()
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))
    assert server.loading.wait(10)
    return gate


def test_versions_committed_during_a_load_coalesce_into_the_newest(
    publisher: Publisher, server: StandIn
) -> None:
    gate = _park_a_load(publisher, server)
    assert publisher.loading_versions(ALICE) == {1}  # storage keeps version 1 while it loads
    for version in (2, 3, 4):
        publisher.committed(ALICE, version, artifact(ALICE, version))
    gate.set()
    eventually("version 4 served", lambda: _served(publisher, 4), timeout=10, interval=0.02)
    assert [b["lora_path"] for b in server.loads()] == [f"{STORE}/{artifact(ALICE, v)}" for v in (1, 4)]
    assert publisher.loading_versions(ALICE) == set()


def test_a_restarted_server_gets_the_adapter_again(publisher: Publisher, server: StandIn) -> None:
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 2, artifact(ALICE, 2))
    eventually("served", lambda: _served(publisher, 2), timeout=10, interval=0.02)
    with server.lock:
        server.loaded.clear()  # what a restarted server lists
    again = {"alice": f"{STORE}/{artifact(ALICE, 2)}"}
    eventually("loaded again", lambda: server.loaded == again, timeout=10, interval=0.02)
    assert len(server.loads()) == 2


def test_a_refused_load_is_reported_and_retried_until_it_succeeds(
    publisher: Publisher, server: StandIn, seen: Seen
) -> None:
    server.refuse = "LoRA rank 32 is greater than max_lora_rank 16"
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))

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
    publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))

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
        publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))
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


def test_a_pod_that_never_published_an_adapter_unloads_only_that_adapters_files(
    publisher: Publisher, server: StandIn
) -> None:
    """The pod that published alice is gone; another pod of the pool is asked to unload her name."""
    other = StandIn()
    try:
        with server.lock:
            server.loaded["alice"] = f"{STORE}/{artifact(ALICE, 3)}"
        with other.lock:
            other.loaded["alice"] = f"{STORE}/{artifact(BOB, 2)}"  # the name now holds bob's files
            other.loaded["alice-x"] = f"{STORE}/{artifact(ALICE, 3)}"
        publisher.set_servers([Server("vllm-0", server.url), Server("vllm-1", other.url)])
        assert publisher.disown(ALICE) == {}  # not published here, and no name given
        assert publisher.disown(ALICE, served_name="alice") == {"vllm-0": "unloaded", "vllm-1": "absent"}
        assert server.loaded == {}
        assert other.loaded == {
            "alice": f"{STORE}/{artifact(BOB, 2)}",
            "alice-x": f"{STORE}/{artifact(ALICE, 3)}",
        }
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


# ---- the adapter root: where the servers mount the store ---------------------------------------


def _loaded_from(server: StandIn, root: str, *adapters: AdapterId, version: int) -> bool:
    with server.lock:
        loaded = dict(server.loaded)
    assert loaded == {a.name: f"{root}/{artifact(a, version)}" for a in adapters}, loaded
    return True


def test_a_new_adapter_root_loads_every_owned_adapter_again_without_a_commit(
    server: StandIn, seen: Seen
) -> None:
    # Passes only when woken: the root change itself must start the next one.
    publisher = Publisher(seen.observer(), store_root=STORE, resync_seconds=60)
    try:
        publisher.set_adapter_root("/mnt/a")
        publisher.set_servers([Server("vllm-0", server.url)])
        for adapter in (ALICE, BOB):
            publisher.own(adapter, adapter.name, 1, artifact(adapter, 1))
        eventually(
            "both served from /mnt/a",
            lambda: _served(publisher, 1, ALICE) and _served(publisher, 1, BOB),
            timeout=10,
            interval=0.02,
        )
        _loaded_from(server, "/mnt/a", ALICE, BOB, version=1)
        loads_before, published_before = len(server.loads()), len(seen.published)

        gate = server.gate = threading.Event()
        server.loading.clear()
        publisher.set_adapter_root("/mnt/b")
        assert publisher.adapter_root == "/mnt/b"
        assert server.loading.wait(10)
        # While it loads again the server still answers with version 1: nothing is behind.
        assert publisher.lag() == (0, 0.0)
        assert _served(publisher, 1, ALICE) and _served(publisher, 1, BOB)
        gate.set()

        eventually(
            "both loaded again from /mnt/b",
            lambda: _loaded_from(server, "/mnt/b", ALICE, BOB, version=1),
            timeout=10,
            interval=0.02,
        )
        again = server.loads()[loads_before:]
        assert sorted(b["lora_path"] for b in again) == [f"/mnt/b/{artifact(a, 1)}" for a in (ALICE, BOB)]
        assert all(b["load_inplace"] is True for b in again)
        assert publisher.wanted()[ALICE].version == 1  # no commit made it happen
        assert len(seen.published) == published_before  # the same versions: not published anew
        assert publisher.lag() == (0, 0.0) and not seen.failed
    finally:
        publisher.close()


def test_without_an_adapter_root_the_servers_load_from_the_store_root_again(
    publisher: Publisher, server: StandIn
) -> None:
    publisher.set_adapter_root("/mnt/b")
    publisher.set_servers([Server("vllm-0", server.url)])
    publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))
    eventually(
        "served from /mnt/b",
        lambda: _loaded_from(server, "/mnt/b", ALICE, version=1),
        timeout=10,
        interval=0.02,
    )
    publisher.set_adapter_root(None)
    assert publisher.adapter_root == STORE
    eventually(
        "loaded again from the store root",
        lambda: _loaded_from(server, STORE, ALICE, version=1),
        timeout=10,
        interval=0.02,
    )
    paths = [b["lora_path"] for b in server.loads()]
    assert paths == [f"/mnt/b/{artifact(ALICE, 1)}", f"{STORE}/{artifact(ALICE, 1)}"]


def test_an_adapter_owned_before_the_servers_are_known_loads_from_the_root_named_with_them(
    publisher: Publisher, server: StandIn
) -> None:
    publisher.own(ALICE, "alice", 0, artifact(ALICE, 0))  # init lands before any PUT /v1/serving
    publisher.set_adapter_root("/mnt/b")
    publisher.set_servers([Server("vllm-0", server.url)])
    eventually("served", lambda: _served(publisher, 0), timeout=10, interval=0.02)
    assert [b["lora_path"] for b in server.loads()] == [f"/mnt/b/{artifact(ALICE, 0)}"]


# ---- the trainer service hands the publisher what init and PUT /v1/serving say ------------------


class StoreEngine:
    """Stands in for the engine in what init and PUT /v1/serving call; init leaves version 0."""

    ready = True
    store_root = PurePosixPath(STORE)

    def __init__(self) -> None:
        self.states: dict[AdapterId, AdapterRecord] = {}

    def load(self) -> None:
        pass

    def pin_versions(self, pinned: Callable[[AdapterId], Collection[int]]) -> None:
        pass

    def watch_durable(self, fn: Callable[[AdapterId, int, str], None]) -> None:
        pass  # durability sync: a step's answer is its durable moment

    def close(self, timeout: float | None = None) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats()

    def init_adapter(
        self, adapter: AdapterId, lora: LoraSpec, epoch: int, training: TrainingSpec | None
    ) -> InitResult:
        state = AdapterRecord(
            adapter=adapter,
            version=0,
            epoch=epoch,
            lora=lora,
            training=training or TrainingSpec(),
            cached=False,
            cache_bytes=0,
            artifact=artifact(adapter, 0),
        )
        self.states[adapter] = state
        return InitResult(created=True, state=state)

    def get_adapter(self, adapter: AdapterId) -> AdapterRecord:
        if adapter not in self.states:
            raise AdapterNotFound(f"{adapter} does not exist")
        return self.states[adapter]


@pytest.fixture
def service() -> Iterator[TrainerService]:
    engine = cast(Engine, StoreEngine())  # it has only what init and PUT /v1/serving call
    svc = TrainerService(engine, max_queue=4, default_training=TrainingSpec())
    svc.queue.start()
    yield svc
    svc.stop(timeout=10)


def _serving_put(server: StandIn, **root: str) -> wire.ServingRequest:
    return wire.ServingRequest.model_validate(
        {
            "servers": [{"name": "vllm-0", "url": server.url}],
            "adapters": [{"namespace": "team-a", "name": "alice", "served_name": "alice"}],
            **root,
        }
    )


async def _init_alice(service: TrainerService) -> None:
    init = wire.InitRequest.model_validate({"lora": {"rank": 8}, "serving": {"name": "alice"}})
    await service.init(ALICE, init)


async def test_an_init_before_the_first_serving_put_loads_from_the_root_that_put_names(
    service: TrainerService, server: StandIn
) -> None:
    await _init_alice(service)  # no servers known yet: nothing is loaded
    assert service.serving().adapter_root == STORE
    assert service.set_serving(_serving_put(server, adapter_root="/mnt/b")).adapter_root == "/mnt/b"
    eventually("served from /mnt/b", lambda: _served(service.publisher, 0), timeout=10, interval=0.02)
    assert [b["lora_path"] for b in server.loads()] == [f"/mnt/b/{artifact(ALICE, 0)}"]


async def test_a_serving_put_without_an_adapter_root_goes_back_to_the_store_root(
    service: TrainerService, server: StandIn
) -> None:
    await _init_alice(service)
    service.set_serving(_serving_put(server, adapter_root="/mnt/b"))
    eventually(
        "served from /mnt/b",
        lambda: _loaded_from(server, "/mnt/b", ALICE, version=0),
        timeout=10,
        interval=0.02,
    )
    assert service.set_serving(_serving_put(server)).adapter_root == STORE
    assert service.serving().adapter_root == STORE
    eventually(
        "loaded again from the store root",
        lambda: _loaded_from(server, STORE, ALICE, version=0),
        timeout=10,
        interval=0.02,
    )
    assert service.serving().lag_versions == 0


# ---- the API key the servers require (vllm serve --api-key) ------------------------------------

KEY_SECRET = "vllm-key/api-key"  # the Secret and key the operator names (--serving-api-key-secret)


def _keyed_publisher(seen: Seen, key_file: Path) -> Publisher:
    key = ServerKey(key_file, KEY_SECRET)
    return Publisher(
        seen.observer(),
        store_root=STORE,
        client=lambda url: ServerClient(url, api_key=key.read),
        resync_seconds=0.1,
    )


def _failing(publisher: Publisher, *words: str) -> bool:
    """Alice's state on the one server reports an error with all of ``words`` (the version it
    reports stays the last one seen served: a server that refuses to list is not known to lose it)."""
    (state,) = publisher.state(ALICE)
    assert all(w in (state["error"] or "") for w in words), state
    return True


def test_every_call_to_a_server_carries_its_api_key(seen: Seen, tmp_path: Path) -> None:
    server = StandIn(api_key="k-1")
    (tmp_path / "api-key").write_text("k-1\n")  # a Secret's value often ends in a newline
    publisher = _keyed_publisher(seen, tmp_path / "api-key")
    try:
        publisher.set_servers([Server("vllm-0", server.url)])
        publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))
        eventually("served", lambda: _served(publisher, 1), timeout=10, interval=0.02)
        assert publisher.disown(ALICE) == {"vllm-0": "unloaded"}
        routes = {path for path, _ in server.authorizations}
        assert {"/v1/models", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= routes
        assert {given for _, given in server.authorizations} == {"Bearer k-1"}
        assert not seen.failed
    finally:
        publisher.close()
        server.stop()


def test_a_missing_key_names_its_secret_and_a_late_or_rotated_key_is_used_without_a_restart(
    seen: Seen, tmp_path: Path
) -> None:
    server = StandIn(api_key="k-1")
    key_file = tmp_path / "api-key"  # absent: the Secret does not exist (yet)
    publisher = _keyed_publisher(seen, key_file)
    try:
        publisher.set_servers([Server("vllm-0", server.url)])
        publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))
        words = ("API key is missing", "key 'api-key' of Secret 'vllm-key'", "apiKeySecretRef")
        eventually("the missing key reported", lambda: _failing(publisher, *words), timeout=10, interval=0.02)
        assert publisher.state(ALICE)[0]["version"] is None
        assert "api_key" in seen.failed
        assert server.authorizations == []  # nothing is sent without the key

        key_file.write_text("k-1")  # the kubelet writes the file once the Secret exists
        eventually("served with the key", lambda: _served(publisher, 1), timeout=30, interval=0.05)

        # The servers' key is rotated (they restart with the new one, empty): the old key is
        # refused, and said so without showing it, until the file holds the new one.
        with server.lock:
            server.api_key, server.loaded = "k-2", {}
        refused = ("answered 401", "refused the API key")
        eventually("the old key refused", lambda: _failing(publisher, *refused), timeout=30, interval=0.05)
        assert "k-1" not in (publisher.state(ALICE)[0]["error"] or "")
        key_file.write_text("k-2\n")
        eventually("served with the new key", lambda: _served(publisher, 1), timeout=30, interval=0.05)
        assert server.loaded == {"alice": f"{STORE}/{artifact(ALICE, 1)}"}
    finally:
        publisher.close()
        server.stop()


def test_a_server_that_requires_a_key_the_pool_does_not_name_says_so(publisher: Publisher) -> None:
    server = StandIn(api_key="k-1")
    try:
        publisher.set_servers([Server("vllm-0", server.url)])
        publisher.own(ALICE, "alice", 1, artifact(ALICE, 1))
        words = ("answered 401", "requires an API key", "spec.serving.apiKeySecretRef")
        eventually("the refusal explained", lambda: _failing(publisher, *words), timeout=10, interval=0.02)
        assert {given for _, given in server.authorizations} == {None}
    finally:
        server.stop()


async def test_the_trainers_settings_give_its_publisher_the_key(tmp_path: Path) -> None:
    """``--serving-api-key-file`` / ``--serving-api-key-secret`` (what the operator's pod passes)
    reach every call the trainer service's publisher makes."""
    server = StandIn(api_key="k-1")
    (tmp_path / "api-key").write_text("k-1")
    settings = TrainerSettings(serving_api_key_file=tmp_path / "api-key", serving_api_key_secret=KEY_SECRET)
    svc: TrainerService = create_app(settings, engine=cast(Engine, StoreEngine())).state.service
    svc.queue.start()
    try:
        await _init_alice(svc)
        svc.set_serving(_serving_put(server))
        eventually("served", lambda: _served(svc.publisher, 0), timeout=10, interval=0.02)
        assert {given for _, given in server.authorizations} == {"Bearer k-1"}
    finally:
        svc.stop(timeout=10)
        server.stop()
