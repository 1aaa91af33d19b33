"""The step queue: one worker thread runs adapter writes one at a time, in arrival order.

A trainer pod owns one GPU, and a step uses all of it, so steps run strictly one after another.
Every write (init, distill, evict, delete) goes through the same FIFO, which keeps each adapter's
writes in the order they arrived. Distill steps are bounded (``max_waiting``) because they are the
expensive ones: past the bound a request is refused with :class:`QueueFull` instead of waiting
without end. A job is a ``concurrent.futures.Future``: cancelling it succeeds only while it waits,
so a step either runs to completion or never starts.

A job may be *batchable* (:class:`Together`): when the worker takes it, the waiting jobs right
behind it of the same kind join it, up to ``max_together``, and run as one call that answers each
its own (the service's distill steps: the engine fuses them). Only the unbroken run of such jobs at
the head of the queue joins, and never two of one member (adapter), so every adapter's writes
still run in arrival order.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lorafleet_trainer.errors import NotReady, QueueFull

T = TypeVar("T")

# Weight of the newest step in the running mean that Retry-After is estimated from.
_EWMA_WEIGHT = 0.2


@dataclass(frozen=True)
class Together:
    """What lets a job run in one call with the waiting jobs of its ``kind``: ``run`` takes their
    payloads in queue order and returns one outcome each (a result, or the exception to raise)."""

    kind: str
    member: Hashable  # never two jobs of one member in one call
    payload: Any
    run: Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class Job(Generic[T]):
    """One queued call; ``future`` carries its result, the timestamps its queue and run time."""

    fn: Callable[[], T]
    bounded: bool
    together: Together | None = None
    future: Future[T] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or self.enqueued_at) - self.enqueued_at

    @property
    def run_seconds(self) -> float:
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at


class StepQueue:
    """A FIFO of jobs served by one thread; start it with :meth:`start`, stop it with :meth:`close`."""

    def __init__(self, max_waiting: int, name: str = "lorafleet-steps", max_together: int = 1) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        if max_together < 1:
            raise ValueError("max_together must be at least 1")
        self.max_waiting = max_waiting
        self.max_together = max_together
        self.ran_together = 0  # jobs that ran in a call with others (batchable jobs joined up)
        self._jobs: collections.deque[Job[Any]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: Job[Any] | None = None
        self._mean_run_seconds = 0.0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, fn: Callable[[], T], *, bounded: bool = True, together: Together | None = None
    ) -> Job[T]:
        """Queue ``fn``; raises :class:`QueueFull` past the bound, :class:`NotReady` once closed.

        With ``together`` the job may run in one call with waiting jobs of its kind (``fn`` is then
        not called: ``together.run`` answers it)."""
        with self._cond:
            if self._closed:
                raise NotReady("the trainer is shutting down; retry on another pod")
            if bounded and self._waiting_bounded() >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} steps are already waiting; retry later")
            job: Job[T] = Job(fn=fn, bounded=bounded, together=together)
            self._jobs.append(job)
            self._cond.notify()
            return job

    def _waiting_bounded(self) -> int:
        return sum(1 for job in self._jobs if job.bounded and not job.future.cancelled())

    @property
    def depth(self) -> int:
        """Jobs waiting to start (not the running one); cancelled jobs no longer count."""
        with self._cond:
            return sum(1 for job in self._jobs if not job.future.cancelled())

    @property
    def busy(self) -> bool:
        return self._running is not None

    def retry_after_seconds(self) -> int:
        """A client's fair wait before retrying: the queue's expected drain time, at least 1 s."""
        with self._cond:
            pending = self._waiting_bounded() + (1 if self._running is not None else 0)
            return max(1, math.ceil(pending * self._mean_run_seconds))

    def close(self) -> int:
        """Stop taking jobs and fail every waiting one with :class:`NotReady`; returns how many.

        The running job, if any, finishes; :meth:`join` waits for it.
        """
        with self._cond:
            self._closed = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        failed = 0
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReady("the trainer shut down before this step started"))
                failed += 1
        return failed

    @property
    def closed(self) -> bool:
        return self._closed

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish its last job; True when it has."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return  # closed and drained
                job = self._jobs.popleft()
                # False when the caller cancelled while the job waited: it never runs.
                if not job.future.set_running_or_notify_cancel():
                    continue
                self._running = job
                group = self._joiners(job)
            if group:
                self._run_together([job, *group])
            else:
                self._run(job)
            # Hold nothing while waiting for the next job: a finished job (its result, or its error
            # with a traceback) must not stay alive for as long as the queue idles.
            del job, group

    def _joiners(self, job: Job[Any]) -> list[Job[Any]]:
        """The waiting jobs that run with ``job`` (under the lock): the unbroken run of its kind at
        the head of the queue, distinct members, up to ``max_together`` in all; each marked running."""
        first = job.together
        if first is None or self.max_together < 2:
            return []
        members = {first.member}
        out: list[Job[Any]] = []
        while self._jobs and len(out) + 1 < self.max_together:
            nxt = self._jobs[0]
            if nxt.future.cancelled():
                self._jobs.popleft()  # left while waiting: it never runs
                continue
            t = nxt.together
            if t is None or t.kind != first.kind or t.run != first.run or t.member in members:
                break
            self._jobs.popleft()
            if nxt.future.set_running_or_notify_cancel():
                members.add(t.member)
                out.append(nxt)
        return out

    def _run_together(self, jobs: list[Job[Any]]) -> None:
        """One call for ``jobs`` (batchable, one kind); each future gets its own outcome."""
        started = time.perf_counter()
        for job in jobs:
            job.started_at = started
        first = jobs[0].together
        assert first is not None
        try:
            outcomes: Sequence[Any] = first.run(
                [job.together.payload for job in jobs if job.together is not None]
            )
            if len(outcomes) != len(jobs):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(jobs)} jobs")
        except BaseException as exc:  # every job of the call fails with the call
            outcomes = [exc] * len(jobs)
        finished = time.perf_counter()
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.finished_at = finished
            if isinstance(outcome, BaseException):
                traceback.clear_frames(outcome.__traceback__)
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        with self._cond:
            self._running = None
            self.ran_together += len(jobs)
            share = (finished - started) / len(jobs)  # the drain estimate counts each job's share
            for job in jobs:
                if job.bounded:
                    w = _EWMA_WEIGHT if self._mean_run_seconds else 1.0
                    self._mean_run_seconds += w * (share - self._mean_run_seconds)

    def _run(self, job: Job[Any]) -> None:
        job.started_at = time.perf_counter()
        try:
            result = job.fn()
        except BaseException as exc:  # the caller decides what an error means
            job.finished_at = time.perf_counter()
            # The error goes to the caller with its traceback printable but its frames' locals
            # cleared: a failed step's graph and buffers must not live as long as the future.
            traceback.clear_frames(exc.__traceback__)
            job.future.set_exception(exc)
        else:
            job.finished_at = time.perf_counter()
            job.future.set_result(result)
        finally:
            with self._cond:
                self._running = None
                if job.bounded:
                    w = _EWMA_WEIGHT if self._mean_run_seconds else 1.0
                    self._mean_run_seconds += w * (job.run_seconds - self._mean_run_seconds)
