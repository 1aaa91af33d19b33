"""Queueing over real HTTP: the bound answers 429 with Retry-After, accepted steps apply exactly
once and in arrival order, a client that leaves while queued drops its step, and SIGTERM finishes
the running step, refuses the waiting ones and exits.

Each test parks its first step at a test hold (``lorafleet_trainer.engine.holds``) and releases it itself:
what is queued behind the running step, and what is answered before it ends, is settled by the
test, never by how long a step takes, so the tests pass on a machine of any speed.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.trainer.service import live, payloads

from lorafleet_local import polling
from lorafleet_trainer.engine.holds import PhaseHolds

DEPTH = ("lorafleet_trainer_queue_depth", ())
RUNNING = ("lorafleet_trainer_step_running", ())
# The held step has started (its adapter restored) but changed nothing yet.
HOLD = "compute"
# Every step these tests send; its size does not matter, the hold keeps the worker busy.
STEP = payloads.distill_body()


def start_trainer(workdir: Path, model_cache: Path, *args: str) -> live.LiveTrainer:
    """A trainer whose steps the test can hold (the holds live beside its storage)."""
    hold_dir = workdir / "holds"
    return live.start_trainer(
        workdir, model_cache_dir=model_cache, args=["--test-hold-dir", str(hold_dir), *args]
    )


def holds_of(server: live.LiveTrainer) -> PhaseHolds:
    return PhaseHolds(server.storage.parent / "holds")


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[live.LiveTrainer]:
    server = start_trainer(tmp_path_factory.mktemp("queue"), model_cache, "--max-queue", "2")
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


@contextlib.contextmanager
def held_step(
    pool: ThreadPoolExecutor, server: live.LiveTrainer, url: str
) -> Iterator[Future[httpx.Response]]:
    """Send a step and park it at the hold: the worker runs it (the only one sent so far, so its
    order is settled) and stays busy with it while the test queues more; leaving the block
    releases it."""
    holds = holds_of(server)
    holds.arm(HOLD)
    try:
        running = pool.submit(post, server, url, STEP)
        polling.eventually(
            f"the step to park before {HOLD}", lambda: holds.held(HOLD), 120, 0.01, child=server.child
        )
        yield running
    finally:
        holds.release(HOLD)


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


def steps_total(server: live.LiveTrainer, outcome: str) -> float:
    return server.metrics()[("lorafleet_trainer_steps_total", (("outcome", outcome),))]


def test_a_full_queue_answers_429_and_accepted_steps_apply_exactly_once(
    small_queue: live.LiveTrainer,
) -> None:
    url = init(small_queue, "burst")
    rejected_before = steps_total(small_queue, "rejected")
    with ThreadPoolExecutor(max_workers=10) as pool:
        with held_step(pool, small_queue, url) as running:
            waiting = enqueue(pool, small_queue, url, STEP, depth=1)
            burst = [pool.submit(post, small_queue, url, STEP) for _ in range(6)]
            # While the worker is held, one more fits beside the waiting one; the rest bounce.
            polling.eventually("the burst's refusals", lambda: sum(f.done() for f in burst) >= 5, 120, 0.01)
            wait_depth(small_queue, 2)
            assert not running.done() and not waiting.done()
        answers = [f.result() for f in [running, waiting, *burst]]
    codes = [r.status_code for r in answers]
    assert sorted(codes) == [200] * 3 + [429] * 5, codes
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]
    state = small_queue.client().get("/v1/adapters/q/burst").json()
    assert state["version"] == 3
    assert sorted(r.json()["version"] for r in answers if r.status_code == 200) == [1, 2, 3]
    assert steps_total(small_queue, "rejected") == rejected_before + 5


def test_steps_for_one_adapter_keep_their_arrival_order(small_queue: live.LiveTrainer) -> None:
    url = init(small_queue, "ordered")
    with ThreadPoolExecutor(max_workers=4) as pool:
        with held_step(pool, small_queue, url) as first:
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
    cancelled_before = steps_total(small_queue, "cancelled")
    with ThreadPoolExecutor(max_workers=2) as pool:
        with held_step(pool, small_queue, url) as running:
            sock = _send_and_hang_up(small_queue, url, httpx.Request("POST", "/", json=STEP).content)
            wait_depth(small_queue, 1)
            sock.close()
            # Dropped from the queue while the step ahead of it still runs: it never got to run.
            wait_depth(small_queue, 0)
            assert not running.done()
        assert running.result().status_code == 200
    assert steps_total(small_queue, "cancelled") == cancelled_before + 1
    assert small_queue.client().get("/v1/adapters/q/leaver").json()["version"] == 1


def test_sigterm_finishes_the_running_step_refuses_waiting_ones_and_exits(
    tmp_path: Path, model_cache: Path
) -> None:
    server = start_trainer(tmp_path / "srv", model_cache)
    try:
        url = init(server, "term")
        with ThreadPoolExecutor(max_workers=2) as pool:
            with held_step(pool, server, url) as running:
                waiting = enqueue(pool, server, url, STEP, depth=1)
                server.process.terminate()
                # Refused at once, while the running step is still held: shutdown does not make
                # the waiting steps wait for it, and it waits for the running one.
                second = waiting.result(timeout=120)
                assert not running.done()
                assert server.process.poll() is None, server.log_tail()
            first = running.result()
        assert first.status_code == 200 and first.json()["version"] == 1
        assert second.status_code == 503, second.text
        assert "shut" in second.json()["error"]
        server.process.wait(120)
        # uvicorn re-raises the signal after a clean shutdown: killed by SIGTERM is the clean exit.
        assert server.process.returncode in (0, -15), server.log_tail()
    finally:
        server.stop()
    # The store holds exactly the one finished step.
    restarted = start_trainer(tmp_path / "srv", model_cache)
    try:
        assert restarted.client().get("/v1/adapters/q/term").json()["version"] == 1
    finally:
        restarted.stop()


def test_reads_answer_while_a_step_runs(small_queue: live.LiveTrainer) -> None:
    url = init(small_queue, "reader")
    c = small_queue.client()
    with ThreadPoolExecutor(max_workers=1) as pool:
        with held_step(pool, small_queue, url) as running:
            state = c.get("/v1/adapters/q/reader")
            cache = c.get("/v1/cache")
            # Answered before the step finished: the worker is still busy with it.
            assert small_queue.metrics()[RUNNING] == 1
            assert not running.done()
        assert state.status_code == 200 and state.json()["version"] == 0
        assert cache.status_code == 200
        assert running.result().status_code == 200
    assert c.get("/v1/adapters/q/reader").json()["version"] == 1
