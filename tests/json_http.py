"""JSON answers from the tests' small stand-in servers (``http.server`` handlers)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any


def answer(handler: BaseHTTPRequestHandler, code: int, body: Any) -> None:
    """Send ``body`` (JSON-encodable, or bytes already encoded as JSON) with ``code``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
