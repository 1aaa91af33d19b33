"""A stand-in inference server speaking vLLM's OpenAI API and runtime LoRA API over real HTTP.

It keeps what is loaded by name and path, as vLLM does, and can be told to refuse loads, to stop
answering, to forget everything (a restart), or to hold a load until the test releases it. Started
with ``api_key``, it answers every ``/v1`` request without ``Authorization: Bearer <api_key>`` with
401, as ``vllm serve --api-key`` does. Chats and completions answer with the model they were asked
for. Every request's ``Authorization`` header is kept (``authorizations``).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests import json_http


class StandIn:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.authorizations: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.refuse: str | None = None  # a load answers 400 with this message
        self.gate: threading.Event | None = None  # a load waits for it
        self.loading = threading.Event()  # a load has arrived
        self.answered = threading.Event()  # a load has been answered
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: Any) -> None:
                json_http.answer(self, code, body)

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization")
                with stand_in.lock:
                    stand_in.authorizations.append((self.path, given))
                if stand_in.api_key is None or given == f"Bearer {stand_in.api_key}":
                    return True
                self._answer(401, {"error": "Unauthorized"})  # vLLM's answer to a wrong or no key
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                with stand_in.lock:
                    cards = [{"id": n, "root": p, "parent": "base"} for n, p in stand_in.loaded.items()]
                self._answer(200, {"data": [{"id": "base", "root": "/m", "parent": None}, *cards]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorized():
                    return
                stand_in.calls.append((self.path, body))
                if self.path in ("/v1/chat/completions", "/v1/completions"):
                    self._complete(body)
                    return
                name = body["lora_name"]
                if self.path == "/v1/unload_lora_adapter":
                    with stand_in.lock:
                        found = stand_in.loaded.pop(name, None)
                    self._answer(200 if found else 404, {"message": "ok" if found else "not found"})
                    return
                stand_in.loading.set()
                if stand_in.gate is not None:
                    stand_in.gate.wait(30)
                try:
                    self._load(name, body)
                finally:
                    stand_in.answered.set()

            def _complete(self, body: dict[str, Any]) -> None:
                with stand_in.lock:
                    known = body.get("model") in stand_in.loaded
                if not known:
                    missing = f"The model `{body.get('model')}` does not exist."
                    self._answer(404, {"error": {"message": missing}})
                    return
                message = {"role": "assistant", "content": "hello"}
                self._answer(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    },
                )

            def _load(self, name: str, body: dict[str, Any]) -> None:
                if stand_in.refuse:
                    self._answer(400, {"error": {"message": stand_in.refuse}})
                    return
                with stand_in.lock:
                    if name in stand_in.loaded and not body.get("load_inplace"):
                        self._answer(400, {"error": {"message": "already loaded"}})
                        return
                    stand_in.loaded[name] = body["lora_path"]
                self._answer(200, "Success")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def loads(self) -> list[dict[str, Any]]:
        return [b for path, b in self.calls if path == "/v1/load_lora_adapter"]

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
