"""What changed on this trainer, so the operator can follow each commit instead of polling.

Every change an adapter's status shows (a committed version, an init, a server that loaded a version
or failed to) takes the next sequence number. ``GET /v1/changes?since=N&instance=I&wait=S`` answers
the adapters changed after ``N``, waiting up to ``S`` seconds for the first change. The numbers
belong to one process (``instance``): a follower that names another instance (the trainer
restarted) is given the current number and no adapters, and follows from there; what it missed is
the resync's to catch.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

from lorafleet_trainer.ids import AdapterId


class Changes:
    def __init__(self) -> None:
        self.instance = uuid.uuid4().hex
        self._seq = 0
        self._changed: dict[AdapterId, int] = {}
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    def mark(self, adapter: AdapterId) -> None:
        """Record a change of ``adapter`` (from any thread) and wake the waiting followers."""
        with self._lock:
            self._seq += 1
            self._changed[adapter] = self._seq
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)

    def forget(self, adapter: AdapterId) -> None:
        with self._lock:
            self._changed.pop(adapter, None)

    async def after(self, since: int, instance: str | None, wait: float) -> tuple[int, list[AdapterId]]:
        """The current number and the adapters changed after ``since`` (waiting up to ``wait`` s
        for one); none when ``instance`` is another process's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            with self._lock:
                if instance != self.instance:
                    return self._seq, []
                if self._seq > since:
                    newer = [a for a, seq in self._changed.items() if seq > since]
                    return self._seq, sorted(newer, key=self._changed.__getitem__)  # by last change
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return self._seq, []
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.add((loop, future))
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    self._waiters.discard((loop, future))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
