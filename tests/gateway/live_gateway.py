"""The gateway's real app on a real HTTP server (uvicorn, 127.0.0.1, a thread of the test)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from lorafleet_gateway.app import Gateway, build, create_app
from lorafleet_gateway.directory import Adapter, StaticDirectory
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_local.processes import free_port


@contextmanager
def serving(
    known: Sequence[Adapter],
    *,
    tokens_file: Path | None = None,
    trainer_token_file: Path | None = None,
    latest_wait_seconds: float = 2.0,
) -> Iterator[tuple[str, Gateway]]:
    settings = GatewaySettings(
        tokens_file=tokens_file,
        trainer_token_file=trainer_token_file,
        latest_wait_seconds=latest_wait_seconds,
    )
    gateway = build(settings, StaticDirectory(known))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", gateway
    finally:
        server.should_exit = True
        thread.join(timeout=30)
