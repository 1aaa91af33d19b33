"""Clients of the gateway under load: chats and CLaaS feedback, as many users at once.

Each client thread belongs to one adapter and alternates between the gateway replicas on every
request. It chats (greedy, a few tokens) about one of its adapter's training questions, and after
some answers (a seeded draw) sends CLaaS-shaped feedback on the answer it got, naming the completion
and an idempotency key of its own. When a chat is refused (the adapter's server or trainer is being
replaced) it gives feedback on its last answered chat instead, as a user would on an older answer,
so training goes on while serving is down. A refused feedback is retried with the same key,
whichever replica the retry reaches, until it is accepted: the trainer then says which version it
became, and a retry of a step already applied must answer that same version.

What the run keeps, for the test to judge:
- every accepted feedback's key and version, per adapter (exactly-once is checked against the
  trainer's own version afterwards);
- every answer's status code; a 429 or 503 must carry ``Retry-After`` and is waited out, anything
  else but a 200 (and any failure to reach a gateway at all) is an error;
- chats answered by a version older than one the same client was already told of, although the
  gateway said the answer came from the latest version (read-your-writes).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

VERSION_HEADER = "X-LoraFleet-Adapter-Version"
LATEST_HEADER = "X-LoraFleet-Latest"
RETRIED = (429, 503)  # the only refusals a client waits out (with Retry-After)
FEEDBACK_SHARE = 0.3  # of answered chats, the share a client gives feedback on
MAX_TOKENS = 8


@dataclass(frozen=True)
class Workload:
    """One adapter's clients: its ``namespace/name``, the questions they ask and the feedback."""

    adapter: str
    questions: list[str]
    feedback: str


@dataclass
class LoadRun:
    gateways: list[str]
    workloads: list[Workload]
    clients: int = 16
    seed: int = 0
    # A feedback still refused this long after it was first sent is reported, not retried further.
    give_up_s: float = 900.0

    stop: threading.Event = field(default_factory=threading.Event)
    accepted: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    codes: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    older_said: int = 0  # chats the gateway answered by an older version and said so
    unaccepted: list[str] = field(default_factory=list)
    replayed: int = 0  # feedback answered from the trainer's record of a step already applied
    refusals: Counter[str] = field(default_factory=Counter)  # why 429s and 503s were answered
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    chats: int = 0
    started: float = 0.0
    wall_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    # ---- driving -----------------------------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        for i in range(self.clients):
            workload = self.workloads[i % len(self.workloads)]
            t = threading.Thread(target=self._client, args=(i, workload), name=f"client-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def finish(self) -> None:
        """Stop asking; every client's outstanding feedback is still retried until accepted."""
        self.stop.set()
        for t in self._threads:
            t.join()
        self.wall_s = time.monotonic() - self.started

    def feedbacks(self) -> int:
        with self._lock:
            return sum(len(keys) for keys in self.accepted.values())

    # ---- one client --------------------------------------------------------------------------

    def _client(self, index: int, workload: Workload) -> None:
        rng = random.Random(self.seed * 1000 + index)
        told = 0  # the newest version of its adapter this client has been told of
        last: tuple[str, str, str] | None = None  # (question, answer, completion id)
        sent = 0
        # A fresh connection per request: a kept-alive one that the gateway's server closes as idle
        # (uvicorn, after 5 s) just as the next request goes out is reset mid-request, a race of
        # HTTP keep-alive on the client's side, not an answer of the gateway's.
        with httpx.Client(timeout=600.0, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not self.stop.is_set():
                question = workload.questions[rng.randrange(len(workload.questions))]
                body = {
                    "model": workload.adapter,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0.0,
                }
                r = self._post(http, sent, "/v1/chat/completions", body)
                sent += 1
                if r is None:
                    continue
                if r.status_code == 200:
                    answer = r.json()
                    version = int(r.headers[VERSION_HEADER])
                    self._judge_chat(index, workload, version, r.headers.get(LATEST_HEADER), told)
                    last = (question, str(answer["choices"][0]["message"]["content"]), str(answer["id"]))
                    if rng.random() >= FEEDBACK_SHARE:
                        continue
                elif last is None:
                    continue  # refused before any answer: nothing to give feedback on yet
                question, text, completion = last
                item = {
                    "lora_id": workload.adapter,
                    "prompt": question,
                    "response": text,
                    "feedback": workload.feedback,
                    "completion_id": completion,
                    "idempotency_key": f"load-{self.seed}-{index}-{sent}",
                }
                version = self._feedback(http, index, workload, item)
                sent += 1
                told = max(told, version or 0)

    def _judge_chat(
        self, index: int, workload: Workload, version: int, latest: str | None, told: int
    ) -> None:
        with self._lock:
            self.chats += 1
            if latest == "false":
                self.older_said += 1
            elif version < told:
                self.stale.append(
                    f"client {index}: {workload.adapter} answered by v{version} (said latest) after v{told}"
                )

    def _feedback(
        self, http: httpx.Client, index: int, workload: Workload, item: dict[str, Any]
    ) -> int | None:
        first = time.monotonic()
        attempt = 0
        while time.monotonic() - first < self.give_up_s:
            r = self._post(http, index + attempt, "/v1/feedback", item)
            attempt += 1
            if r is not None and r.status_code == 200:
                answer = r.json()
                version = int(answer["version"])
                with self._lock:
                    self.replayed += any(step.get("replayed") for step in answer["results"])
                    seen = self.accepted[workload.adapter].setdefault(item["idempotency_key"], version)
                    if seen != version:
                        self.errors.append(f"{item['idempotency_key']} answered v{seen}, then v{version}")
                return version
            if r is not None and r.status_code not in RETRIED:
                return None  # an error, already recorded
        with self._lock:
            self.unaccepted.append(item["idempotency_key"])
        return None

    def _post(self, http: httpx.Client, turn: int, route: str, body: dict[str, Any]) -> httpx.Response | None:
        """One request through the replica whose turn it is. A refusal with Retry-After is waited
        out here (it is still returned); any other non-200 answer is an error."""
        gateway = self.gateways[turn % len(self.gateways)]
        started = time.monotonic()
        try:
            r = http.post(gateway + route, json=body)
        except httpx.HTTPError as exc:
            with self._lock:
                self.errors.append(f"{route} via {gateway}: {exc!r}")
            return None
        with self._lock:
            self.codes[(route, r.status_code)] += 1
            if r.status_code == 200:
                self.latencies[route].append(time.monotonic() - started)
        if r.status_code == 200:
            return r
        retry_after = r.headers.get("retry-after")
        if r.status_code in RETRIED and retry_after is not None:
            with self._lock:
                self.refusals[_reason(r)] += 1
            time.sleep(float(retry_after))  # the server's own pacing, not a guess at an outcome
            return r
        with self._lock:
            self.errors.append(f"{route} via {gateway}: {r.status_code} {r.text[:300]}")
        return r

    # ---- the report --------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        codes: dict[str, dict[int, int]] = defaultdict(dict)
        for (route, code), n in sorted(self.codes.items()):
            codes[route][code] = n
        return {
            "clients": self.clients,
            "wall_s": round(self.wall_s, 1),
            "chats_answered": self.chats,
            "feedback_accepted": {a: len(k) for a, k in self.accepted.items()},
            "codes": dict(codes),
            "latency_s": {route: _percentiles(xs) for route, xs in self.latencies.items()},
            "replayed_feedback": self.replayed,
            "refusals": dict(self.refusals.most_common(8)),
            "answered_by_older_and_said_so": self.older_said,
            "stale": len(self.stale),
            "errors": len(self.errors),
            "unaccepted": len(self.unaccepted),
        }


def _reason(r: httpx.Response) -> str:
    """A refusal's message with its names and numbers taken out, so alike refusals count as one."""
    try:
        message = str(r.json().get("error", ""))
    except ValueError:
        message = r.text
    message = re.sub(r"'[^']*'|\S*://\S*|\d+", "_", message)
    return f"{r.status_code} {message[:100]}"


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def at(q: float) -> float:
        return round(xs[max(0, min(len(xs) - 1, round(q * len(xs)) - 1))], 2) if xs else 0.0

    return {"n": len(xs), "p50": at(0.5), "p95": at(0.95)}
