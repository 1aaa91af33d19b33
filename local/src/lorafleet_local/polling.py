"""Waiting for a condition that another process makes true: poll it, and fail naming what it was.

The local cluster waits on servers that are starting (etcd, the API server, a pod's readiness) and
on objects that controllers reconcile; the tests wait the same way. A check that raises counts as
"not yet" (a server still starting refuses connections); a child process that exits while it is
awaited fails the wait at once with its log tail, instead of at the timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

from lorafleet_local import processes


def eventually(
    what: str,
    check: Callable[[], Any],
    timeout: float = 120.0,
    interval: float = 0.5,
    child: processes.Child | None = None,
) -> Any:
    """Poll check() until it returns something truthy and return that.

    Raises TimeoutError naming ``what`` and the last result (or error) after ``timeout`` seconds,
    and RuntimeError with the child's log tail as soon as ``child`` exits.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(
                f"{child.name} exited ({child.popen.returncode}) while waiting for {what}:\n"
                + child.log_tail()
            )
        try:
            last = check()
        except Exception as exc:  # not there yet: a server still starting, an object not created
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            tail = f"\n{child.name} log:\n{child.log_tail()}" if child is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}{tail}")
        time.sleep(interval)


async def eventually_async(
    what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """eventually() for code on an event loop: check() may return an awaitable, and the loop runs
    between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)
