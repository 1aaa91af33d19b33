"""The step queue: one worker, FIFO order, a bound on waiting steps, cancel-before-start, close."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from lorafleet_trainer.errors import NotReady, QueueFull
from lorafleet_trainer.service.queueing import StepQueue


@pytest.fixture
def queue() -> Iterator[StepQueue]:
    q = StepQueue(max_waiting=3)
    q.start()
    yield q
    q.close()
    assert q.join(5)


def blocker(q: StepQueue) -> threading.Event:
    """Occupy the worker until the returned event is set."""
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    q.submit(hold, bounded=False)
    assert started.wait(5)
    return release


def test_jobs_run_one_at_a_time_in_arrival_order(queue: StepQueue) -> None:
    seen: list[int] = []
    active = 0
    overlap = False
    lock = threading.Lock()

    def step(i: int) -> int:
        nonlocal active, overlap
        with lock:
            active += 1
            overlap = overlap or active > 1
        time.sleep(0.002)
        seen.append(i)
        with lock:
            active -= 1
        return i * 10

    release = blocker(queue)
    jobs = [queue.submit(lambda i=i: step(i), bounded=False) for i in range(20)]
    release.set()
    assert [j.future.result(5) for j in jobs] == [i * 10 for i in range(20)]
    assert seen == list(range(20))
    assert not overlap
    assert all(j.started_at is not None and j.run_seconds > 0 for j in jobs)


def test_bound_counts_only_waiting_bounded_jobs(queue: StepQueue) -> None:
    release = blocker(queue)
    jobs = [queue.submit(lambda: 1) for _ in range(3)]
    with pytest.raises(QueueFull):
        queue.submit(lambda: 1)
    # Control writes are never refused by the bound.
    control = queue.submit(lambda: 2, bounded=False)
    assert queue.depth == 4
    assert queue.retry_after_seconds() >= 1
    release.set()
    assert [j.future.result(5) for j in jobs] == [1, 1, 1]
    assert control.future.result(5) == 2
    assert queue.depth == 0


def test_cancelled_waiting_job_never_runs_and_frees_its_slot(queue: StepQueue) -> None:
    ran: list[str] = []
    release = blocker(queue)
    dropped = queue.submit(lambda: ran.append("dropped"))
    kept = queue.submit(lambda: ran.append("kept"))
    assert dropped.future.cancel()
    assert queue.depth == 1
    release.set()
    kept.future.result(5)
    assert ran == ["kept"]


def test_a_running_job_cannot_be_cancelled(queue: StepQueue) -> None:
    release = threading.Event()
    started = threading.Event()

    def hold() -> str:
        started.set()
        release.wait(5)
        return "done"

    job = queue.submit(hold)
    assert started.wait(5)
    assert not job.future.cancel()
    release.set()
    assert job.future.result(5) == "done"


def test_errors_reach_the_caller_and_the_worker_survives(queue: StepQueue) -> None:
    def boom() -> None:
        raise ValueError("bad step")

    failing = queue.submit(boom)
    with pytest.raises(ValueError, match="bad step"):
        failing.future.result(5)
    assert queue.submit(lambda: "next").future.result(5) == "next"


def test_close_fails_waiting_jobs_finishes_the_running_one_and_refuses_new(queue: StepQueue) -> None:
    release = blocker(queue)
    control = queue.submit(lambda: "late", bounded=False)  # waits behind the blocker
    waiting = queue.submit(lambda: "never")
    # Release the blocker only after close, from another thread, as SIGTERM would.
    threading.Timer(0.05, release.set).start()
    assert queue.close() == 2
    with pytest.raises(NotReady):
        control.future.result(5)
    with pytest.raises(NotReady):
        waiting.future.result(5)
    with pytest.raises(NotReady):
        queue.submit(lambda: 1)
    assert queue.join(5)


def test_max_waiting_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StepQueue(0)
