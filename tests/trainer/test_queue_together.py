"""Batchable jobs in the step queue: the unbroken run of one kind at the head of the queue runs as
one call, distinct members only, up to the bound; each job gets its own outcome; order is kept."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from tests.trainer.test_queue import blocker

from lorafleet_trainer.service.queueing import Job, StepQueue, Together


class Recorder:
    """A batch runner that records each call's payloads; a payload "bad" fails only its own job."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, payloads: Sequence[Any]) -> list[Any]:
        self.calls.append(list(payloads))
        return [ValueError(p) if p.startswith("bad") else f"done {p}" for p in payloads]


@pytest.fixture
def queue() -> Iterator[StepQueue]:
    q = StepQueue(max_waiting=16, max_together=3)
    q.start()
    yield q
    q.close()
    assert q.join(5)


def step(q: StepQueue, rec: Recorder, member: str, payload: str) -> Job[Any]:
    def alone() -> str:
        rec.calls.append([payload])
        return f"alone {payload}"

    return q.submit(alone, together=Together("distill", member, payload, rec.run))


def test_waiting_steps_of_distinct_members_run_as_one_call_each_answered(queue: StepQueue) -> None:
    rec = Recorder()
    release = blocker(queue)
    jobs = [step(queue, rec, m, p) for m, p in [("a", "a1"), ("b", "bad b1"), ("c", "c1")]]
    release.set()
    assert jobs[0].future.result(5) == "done a1" and jobs[2].future.result(5) == "done c1"
    with pytest.raises(ValueError, match="bad b1"):
        jobs[1].future.result(5)
    assert rec.calls == [["a1", "bad b1", "c1"]]
    assert queue.ran_together == 3


def test_one_members_steps_never_share_a_call_and_keep_their_order(queue: StepQueue) -> None:
    rec = Recorder()
    release = blocker(queue)
    jobs = [step(queue, rec, m, p) for m, p in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")]]
    release.set()
    assert [j.future.result(5) for j in jobs] == ["done a1", "done b1", "done a2", "done c1"]
    # a2 stops the run (its member already joined): it leads the next call.
    assert rec.calls == [["a1", "b1"], ["a2", "c1"]]


def test_the_bound_and_other_jobs_end_a_run(queue: StepQueue) -> None:
    rec = Recorder()
    release = blocker(queue)
    jobs = [step(queue, rec, m, m + "1") for m in "abcd"]
    other = queue.submit(lambda: "a write", bounded=False)
    late = step(queue, rec, "e", "e1")
    release.set()
    assert late.future.result(5) == "alone e1"  # alone: no batchable job waits behind it
    assert other.future.result(5) == "a write"
    assert [j.future.result(5) for j in jobs] == ["done a1", "done b1", "done c1", "alone d1"]
    assert rec.calls == [["a1", "b1", "c1"], ["d1"], ["e1"]]


def test_a_cancelled_step_is_skipped_and_a_failed_call_fails_each_job(queue: StepQueue) -> None:
    def broken(payloads: Sequence[Any]) -> list[Any]:
        raise RuntimeError("the device is gone")

    release = blocker(queue)
    jobs = [queue.submit(lambda: None, together=Together("distill", m, m, broken)) for m in "abc"]
    assert jobs[1].future.cancel()
    release.set()
    for job in (jobs[0], jobs[2]):
        with pytest.raises(RuntimeError, match="device is gone"):
            job.future.result(5)
    assert jobs[1].future.cancelled()


def test_fusing_off_runs_each_step_alone() -> None:
    q = StepQueue(max_waiting=4)  # max_together 1
    q.start()
    try:
        rec = Recorder()
        release = blocker(q)
        jobs = [step(q, rec, m, m + "1") for m in "ab"]
        release.set()
        assert [j.future.result(5) for j in jobs] == ["alone a1", "alone b1"]
        assert q.ran_together == 0
    finally:
        q.close()
        q.join(5)
