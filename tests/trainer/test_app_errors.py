"""Pieces of the app tested alone: field paths in errors, the body limit, CLI refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from lorafleet_trainer.app import field_path
from lorafleet_trainer.http.limiting import BodyLimit


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("body", "samples", 0, "feedback"), "samples[0].feedback"),
        (("body", "samples", 2, "response_logprobs", 7), "samples[2].response_logprobs[7]"),
        (("path", "namespace"), "namespace"),
        (("body",), "body"),
        ((), "body"),
    ],
)
def test_field_path(loc: tuple[object, ...], expected: str) -> None:
    assert field_path(loc) == expected


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    body = message.get("body", b"")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


async def test_body_limit_refuses_with_json_and_passes_what_fits() -> None:
    transport = httpx.ASGITransport(app=BodyLimit(echo, max_bytes=100))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        ok = await c.post("/", content=b"x" * 100)
        assert (ok.status_code, ok.text) == (200, "100")
        big = await c.post("/", content=b"x" * 101)
        assert big.status_code == 413
        assert big.json()["error"].startswith("body: is too large")

        async def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(5):
                yield b"y" * 30

        streamed = await c.post("/", content=chunks())
        assert streamed.status_code == 413


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet_trainer.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_cli_refuses_bad_flags_and_variables_by_name(tmp_path: Path) -> None:
    bad_flag = run_cli("serve", "--max-queue", "0", "--storage", str(tmp_path))
    assert bad_flag.returncode == 2
    assert "--max-queue:" in bad_flag.stderr
    bad_env = run_cli("serve", env={"LORAFLEET_TRAINER_PORT": "eighty"})
    assert bad_env.returncode == 2
    assert "LORAFLEET_TRAINER_PORT:" in bad_env.stderr
    missing_token = run_cli("serve", "--auth-token-file", str(tmp_path / "absent"))
    assert missing_token.returncode == 2
    assert "--auth-token-file:" in missing_token.stderr
    assert not (tmp_path / "adapters").exists()
