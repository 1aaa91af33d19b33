"""The operator's side of a live run: its real metrics server and trainer client, off the test's thread.

The operator's `/metrics` + `/healthz` server and its `TrainerClient` are async; they get an event
loop on a thread of their own so that synchronous tests (and Prometheus scraping them meanwhile)
can drive them with `run(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from lorafleet_operator.metrics import OperatorMetrics, serving
from lorafleet_operator.trainers import TrainerClient

T = TypeVar("T")


class OperatorSide:
    """The operator's metrics server and trainer client, on an event loop of their own."""

    def __init__(self, token: str | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="operator-side", daemon=True)
        self.thread.start()
        self.metrics = OperatorMetrics()
        self.client = TrainerClient(self.metrics, token=token, timeout=120)
        self.stack = contextlib.AsyncExitStack()
        self.port: int = self.run(self.stack.enter_async_context(serving(self.metrics, "127.0.0.1", 0)))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=180)

    def close(self) -> None:
        self.run(self.client.close())
        self.run(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()
