"""The trainer's change log that the operator follows: numbers, waiting, and another instance."""

from __future__ import annotations

import asyncio
import threading

from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.service.changes import Changes

A, B = AdapterId("team-a", "alice"), AdapterId("team-a", "bob")


async def test_changes_after_a_number_once_each_and_in_order() -> None:
    changes = Changes()
    seq, none = await changes.after(0, None, wait=5)  # another instance: the number, nothing else
    assert (seq, none) == (0, [])
    changes.mark(A)
    changes.mark(B)
    changes.mark(A)
    assert await changes.after(0, changes.instance, wait=0) == (3, [B, A])
    assert await changes.after(2, changes.instance, wait=0) == (3, [A])
    assert await changes.after(3, changes.instance, wait=0) == (3, [])  # nothing new, no wait asked
    assert await changes.after(3, "another-process", wait=5) == (3, [])
    changes.forget(A)
    assert await changes.after(0, changes.instance, wait=0) == (3, [B])


async def test_a_waiting_follower_wakes_on_a_change_from_another_thread() -> None:
    changes = Changes()
    waiting = asyncio.create_task(changes.after(0, changes.instance, wait=60))
    while not changes._waiters:  # the follower is parked on its future
        await asyncio.sleep(0)
    worker = threading.Thread(target=changes.mark, args=(A,))  # a step commits on a worker thread
    worker.start()
    assert await asyncio.wait_for(waiting, 30) == (1, [A])
    worker.join()
    assert not changes._waiters


async def test_a_follower_that_times_out_leaves_nothing_behind() -> None:
    changes = Changes()
    assert await changes.after(0, changes.instance, wait=0.01) == (0, [])
    assert not changes._waiters
