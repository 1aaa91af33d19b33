"""What the gateway served: each completion by its id and by the SHA-256 of its text.

A feedback names the answer it is about by its text (CLaaS clients send the response back) or by
its completion id; the record gives back what a distill step needs and what the client never saw:
the adapter and version that answered, the prompt's and the answer's token ids and the behaviour
log-probabilities. It is bounded in bytes (least recently used first out) and by age, so a feedback
on an answer that was dropped is scored again instead (and says so).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Completion:
    completion_id: str
    namespace: str
    name: str
    version: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    text: str

    @property
    def size(self) -> int:
        ids = len(self.prompt_token_ids) + len(self.response_token_ids) + len(self.response_logprobs)
        return 8 * ids + len(self.text.encode("utf-8")) + 256


class Records:
    def __init__(
        self, max_bytes: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes, self.ttl = max_bytes, ttl_seconds
        self._clock = clock
        self._by_id: OrderedDict[str, tuple[float, Completion]] = OrderedDict()
        self._by_text: dict[str, str] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, completion: Completion) -> None:
        with self._lock:
            self._drop(completion.completion_id)
            self._by_id[completion.completion_id] = (self._clock(), completion)
            self._by_text[text_key(completion.text)] = completion.completion_id
            self._bytes += completion.size
            while self._bytes > self.max_bytes and self._by_id:
                self._drop(next(iter(self._by_id)))

    def find(self, *, completion_id: str | None = None, text: str | None = None) -> Completion | None:
        with self._lock:
            key = completion_id if completion_id is not None else None
            if key is None and text is not None:
                key = self._by_text.get(text_key(text))
            found = self._by_id.get(key) if key is not None else None
            if found is None:
                return None
            at, completion = found
            if self._clock() - at > self.ttl:
                self._drop(completion.completion_id)
                return None
            self._by_id.move_to_end(completion.completion_id)
            return completion

    def _drop(self, completion_id: str) -> None:
        gone = self._by_id.pop(completion_id, None)
        if gone is None:
            return
        completion = gone[1]
        self._bytes -= completion.size
        key = text_key(completion.text)
        if self._by_text.get(key) == completion_id:
            del self._by_text[key]
