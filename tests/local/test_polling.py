"""lorafleet_local.polling: the one wait helper of the local cluster and of every test suite."""

from __future__ import annotations

import itertools
import socket
import sys
from pathlib import Path

import pytest

from lorafleet_local import polling, processes


def test_eventually_returns_the_first_truthy_result_and_retries_errors() -> None:
    answers = iter([ConnectionRefusedError("starting"), None, 0, {"ready": True}])

    def check() -> object:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert polling.eventually("a ready server", check, timeout=10, interval=0) == {"ready": True}


def test_eventually_names_what_it_waited_for_and_the_last_error() -> None:
    def refused() -> None:
        raise ConnectionRefusedError("no listener")

    with pytest.raises(TimeoutError, match=r"waiting for the API server; last: ConnectionRefused"):
        polling.eventually("the API server", refused, timeout=0.2, interval=0.05)


def test_eventually_fails_at_once_with_the_log_of_a_child_that_exits(tmp_path: Path) -> None:
    child = processes.Child(
        "crasher", [sys.executable, "-c", "print('bad flag --x'); raise SystemExit(3)"], tmp_path / "log"
    )
    child.popen.wait(30)
    with pytest.raises(RuntimeError, match=r"crasher exited \(3\) while waiting for its port:\nbad flag --x"):
        polling.eventually("its port", lambda: False, timeout=600, child=child)


async def test_eventually_async_awaits_the_check() -> None:
    counter = itertools.count()

    async def reaches_three() -> bool:
        return next(counter) >= 3

    assert await polling.eventually_async("three polls", reaches_three, timeout=10, interval=0) is True
    with pytest.raises(TimeoutError, match="waiting for never"):
        await polling.eventually_async("never", lambda: False, timeout=0.1)


def test_free_port_can_be_bound() -> None:
    port = processes.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
