"""Hostile requests, sent byte for byte over a raw HTTP connection.

``httpx`` normalises paths (it resolves ``..`` and re-encodes), which would hide exactly the
requests an attacker sends, so these go through ``http.client`` with the path and body as given.
``fingerprint`` is everything a refused request must leave unchanged: every file under the
trainer's work directory (so also nothing written outside its storage) and the cache listing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path
from typing import Any

from tests.trainer.service import live


def raw(
    server: live.LiveTrainer, method: str, path: str, body: bytes | None = None, token: str | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    headers = {"content-type": "application/json"}
    token = server.token if token is None else token
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("content-length", str(len(body or b"")))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fingerprint(server: live.LiveTrainer, workdir: Path) -> dict[str, Any]:
    files = {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != "trainer.log"
    }
    cache = json.loads(raw(server, "GET", "/v1/cache")[1])
    return {"files": files, "cache": cache}
