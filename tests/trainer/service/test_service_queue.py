"""Queueing over real HTTP: the bound answers 429 with Retry-After, accepted steps apply exactly
once and in arrival order, a client that leaves while queued drops its step, and SIGTERM finishes
the running step, refuses the waiting ones and exits."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.trainer.service import live, payloads

DEPTH = ("lorafleet_trainer_queue_depth", ())
RUNNING = ("lorafleet_trainer_step_running", ())
# Heavy enough to keep the worker busy for a while on two shared CPU cores.
SLOW = payloads.distill_body(n=8, prompt_len=96, response_len=96)
LIGHT = payloads.distill_body()


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[live.LiveTrainer]:
    server = live.start_trainer(
        tmp_path_factory.mktemp("queue"), model_cache_dir=model_cache, args=["--max-queue", "2"]
    )
    yield server
    server.stop()


def post(server: live.LiveTrainer, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=600) as c:
        return c.post(path, json=body)


def wait_metric(server: live.LiveTrainer, key: Any, value: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()[key] != value:
        assert time.monotonic() < deadline, f"{key[0]} never reached {value}"
        time.sleep(0.02)


def wait_depth(server: live.LiveTrainer, depth: int) -> None:
    wait_metric(server, DEPTH, depth)


def start_slow(pool: ThreadPoolExecutor, server: live.LiveTrainer, url: str) -> Future[httpx.Response]:
    """Send the SLOW step and wait until the worker runs it (the only one sent so far, so its order
    is settled); the worker stays busy with it while the test queues more."""
    running = pool.submit(post, server, url, SLOW)
    wait_metric(server, RUNNING, 1)
    return running


def enqueue(
    pool: ThreadPoolExecutor, server: live.LiveTrainer, url: str, body: dict[str, Any], depth: int
) -> Future[httpx.Response]:
    """Send a step and wait until the queue holds ``depth`` waiting steps, so it is queued before
    anything sent after it."""
    waiting = pool.submit(post, server, url, body)
    wait_depth(server, depth)
    return waiting


def init(server: live.LiveTrainer, name: str) -> str:
    r = server.client().put(f"/v1/adapters/q/{name}", json=payloads.init_body())
    assert r.status_code == 201, r.text
    return f"/v1/adapters/q/{name}/distill"


def test_a_full_queue_answers_429_and_accepted_steps_apply_exactly_once(
    small_queue: live.LiveTrainer,
) -> None:
    url = init(small_queue, "burst")
    with ThreadPoolExecutor(max_workers=10) as pool:
        running = start_slow(pool, small_queue, url)
        waiting = enqueue(pool, small_queue, url, LIGHT, depth=1)
        burst = [pool.submit(post, small_queue, url, LIGHT) for _ in range(6)]
        answers = [f.result() for f in [running, waiting, *burst]]
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 5, codes  # one more fits beside the waiting one; the rest bounce
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]
    state = small_queue.client().get("/v1/adapters/q/burst").json()
    assert state["version"] == codes.count(200)
    assert sorted(r.json()["version"] for r in answers if r.status_code == 200) == list(
        range(1, codes.count(200) + 1)
    )
    rejected = small_queue.metrics()[("lorafleet_trainer_steps_total", (("outcome", "rejected"),))]
    assert rejected == codes.count(429)


def test_steps_for_one_adapter_keep_their_arrival_order(small_queue: live.LiveTrainer) -> None:
    url = init(small_queue, "ordered")
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = start_slow(pool, small_queue, url)
        later = [
            enqueue(pool, small_queue, url, payloads.distill_body(n=1 + i), depth=i + 1) for i in range(2)
        ]
        versions = [f.result().json()["version"] for f in [first, *later]]
    assert versions == [1, 2, 3]


def _send_and_hang_up(server: live.LiveTrainer, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_that_leaves_while_queued_never_runs_its_step(small_queue: live.LiveTrainer) -> None:
    url = init(small_queue, "leaver")
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = start_slow(pool, small_queue, url)
        cancelled_before = small_queue.metrics()[
            ("lorafleet_trainer_steps_total", (("outcome", "cancelled"),))
        ]
        sock = _send_and_hang_up(small_queue, url, httpx.Request("POST", "/", json=LIGHT).content)
        wait_depth(small_queue, 1)
        sock.close()
        wait_depth(small_queue, 0)
        assert running.result().status_code == 200
    metrics = small_queue.metrics()
    assert metrics[("lorafleet_trainer_steps_total", (("outcome", "cancelled"),))] == cancelled_before + 1
    assert small_queue.client().get("/v1/adapters/q/leaver").json()["version"] == 1


def test_sigterm_finishes_the_running_step_refuses_waiting_ones_and_exits(
    tmp_path: Path, model_cache: Path
) -> None:
    server = live.start_trainer(tmp_path / "srv", model_cache_dir=model_cache)
    try:
        url = init(server, "term")
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = start_slow(pool, server, url)
            waiting = enqueue(pool, server, url, LIGHT, depth=1)
            server.process.terminate()
            first, second = running.result(), waiting.result()
        assert first.status_code == 200 and first.json()["version"] == 1
        assert second.status_code == 503, second.text
        assert "shut" in second.json()["error"]
        server.process.wait(120)
        # uvicorn re-raises the signal after a clean shutdown: killed by SIGTERM is the clean exit.
        assert server.process.returncode in (0, -15), server.log_tail()
    finally:
        server.stop()
    # The store holds exactly the one finished step.
    restarted = live.start_trainer(tmp_path / "srv", model_cache_dir=model_cache)
    try:
        assert restarted.client().get("/v1/adapters/q/term").json()["version"] == 1
    finally:
        restarted.stop()


def test_reads_answer_while_a_step_runs(small_queue: live.LiveTrainer) -> None:
    url = init(small_queue, "reader")
    c = small_queue.client()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = start_slow(pool, small_queue, url)
        state = c.get("/v1/adapters/q/reader")
        cache = c.get("/v1/cache")
        # Answered before the step finished: the worker is still busy with it.
        assert small_queue.metrics()[RUNNING] == 1
        assert not running.done()
        assert state.status_code == 200 and state.json()["version"] == 0
        assert cache.status_code == 200
        assert running.result().status_code == 200
    assert c.get("/v1/adapters/q/reader").json()["version"] == 1
