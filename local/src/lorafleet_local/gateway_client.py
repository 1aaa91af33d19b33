"""A client of LoraFleet's gateway as a production user sees it: OpenAI chats and CLaaS feedback.

The goals CLI's ``--gateway`` mode runs its learning loop through this and nothing else: no trainer
route is called, so what it measures is what a user of the gateway gets. A chat's answer says which
version of the adapter answered (``X-LoraFleet-Adapter-Version``) and whether that was the latest
(``X-LoraFleet-Latest``); a feedback's answer says which version the step committed.

Each chat choice is named ``<answer id>:<choice index>``, the completion id the gateway records it
under, so the feedback on it is built from the gateway's record of that answer (vLLM's own
behaviour log-probabilities) rather than scored again. An error answer becomes a
:class:`GatewayError` that names the call and what the gateway said; a refused token, an adapter
the gateway does not know and one of another namespace each say so in words.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The gateway's own header names (lorafleet_gateway.app); the local package may not import it.
VERSION_HEADER = "x-lorafleet-adapter-version"
LATEST_HEADER = "x-lorafleet-latest"
TOKEN_ENV = "LORAFLEET_GATEWAY_TOKEN"
MAX_BATCH = 64  # the most items one CLaaS batch may carry (lorafleet_gateway.claas.MAX_BATCH)

# (url, JSON body, request headers) -> (status, response headers with lowercase names, decoded JSON)
Send = Callable[[str, Any, Mapping[str, str]], tuple[int, Mapping[str, str], Any]]


class GatewayError(RuntimeError):
    """A gateway call was refused or could not be made; the message names the call and why."""


def post_json(
    url: str, body: Any, headers: Mapping[str, str], timeout: float = 900.0
) -> tuple[int, dict[str, str], Any]:
    """One POST with a JSON body; an error status is an answer like any other, not an exception."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, _decoded(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, _decoded(exc.read())


def _decoded(raw: bytes) -> Any:
    """The JSON answer, or what was said instead (a proxy's HTML page) as the error's text."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return {"error": raw.decode(errors="replace")[:300]}


@dataclass(frozen=True)
class Chat:
    """The answers to one chat (``n`` choices) and the version of the adapter that gave them."""

    version: int  # the oldest version that answered, when it took several requests
    latest: bool  # every answer came from the latest version the gateway knew of
    texts: list[str]
    completion_ids: list[str]


@dataclass(frozen=True)
class Stepped:
    """What one CLaaS feedback request did to the adapter."""

    version: int  # the version the last of its steps committed
    steps: int  # how many distill steps the gateway made of it for this adapter
    replayed: bool  # the idempotency key had been seen: no new step was taken
    loss: float
    samples: list[str]  # where each sample came from: record:<version> or scored:<version>


@dataclass
class GatewayClient:
    """The gateway at ``url``, the adapter ``model`` (``<namespace>/<adapter>``) and a bearer token."""

    url: str
    model: str
    token: str = ""
    send: Send = field(default=post_json)

    def __post_init__(self) -> None:
        namespace, _, name = self.model.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"name the adapter as NAMESPACE/ADAPTER, not {self.model!r}")
        self.url = self.url.rstrip("/")

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        n: int = 1,
        seed: int | None = None,
    ) -> Chat:
        """``n`` answers to ``messages``, asked as one chat with OpenAI's ``n`` (the gateway passes it
        to vLLM and records every choice); a server that gives fewer choices is asked again."""
        texts: list[str] = []
        ids: list[str] = []
        versions: list[int] = []
        latest = True
        while len(texts) < n:
            body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                    "temperature": temperature, "n": n - len(texts)}  # fmt: skip
            if seed is not None:
                body["seed"] = seed + len(texts)
            headers, answer = self._post("/v1/chat/completions", body, f"chat {self.model}")
            choices = answer.get("choices") or []
            if not choices:
                raise GatewayError(f"chat {self.model}: the answer has no choices: {answer}")
            for choice in choices:
                texts.append(str((choice.get("message") or {}).get("content") or ""))
                ids.append(f"{answer.get('id')}:{choice.get('index', 0)}")
            if VERSION_HEADER not in headers:
                raise GatewayError(
                    f"chat {self.model}: the answer names no adapter version ({VERSION_HEADER}):"
                    f" is {self.url} a LoraFleet gateway?"
                )
            versions.append(int(headers[VERSION_HEADER]))
            latest = latest and headers.get(LATEST_HEADER) == "true"
        return Chat(min(versions), latest, texts[:n], ids[:n])

    def feedback(
        self,
        answers: Sequence[Mapping[str, str]],
        feedback: str,
        key: str,
        training: Mapping[str, Any] | None = None,
    ) -> Stepped:
        """One CLaaS batch: every answer (``prompt``, ``response``, ``completion_id``) with the same
        feedback, under idempotency key ``key``. The gateway makes one step of a batch's items for
        one adapter; the count is read from its answer all the same. A 503 or a lost answer is sent
        once more with the same key: the trainer answers a step it already took instead of taking
        it twice."""
        if not answers or len(answers) > MAX_BATCH:
            raise GatewayError(
                f"feedback {self.model}: a batch takes 1 to {MAX_BATCH} answers, not {len(answers)}"
            )
        extra = {"training": dict(training)} if training else {}
        items = [{"lora_id": self.model, "feedback": feedback, **extra, **a} for a in answers]
        what = f"feedback {self.model}"
        try:
            _, answer = self._post("/v1/feedback", {"requests": items}, what, {"Idempotency-Key": key})
        except _Retryable:
            _, answer = self._post("/v1/feedback", {"requests": items}, what, {"Idempotency-Key": key})
        mine = [r for r in answer.get("results", []) if r.get("lora_id") == self.model]
        if not mine:
            raise GatewayError(f"{what}: the answer has no step for this adapter: {answer}")
        return Stepped(
            version=int(mine[-1]["version"]),
            steps=len(mine),
            replayed=any(r.get("replayed") for r in mine),
            loss=float(mine[-1]["distill_result"]["metadata"]["distill_loss"]),
            samples=[s for r in mine for s in r.get("samples", [])],
        )

    def _post(
        self, path: str, body: Any, what: str, headers: Mapping[str, str] | None = None
    ) -> tuple[Mapping[str, str], dict[str, Any]]:
        sent = {**(headers or {}), **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        try:
            status, got, answer = self.send(self.url + path, body, sent)
        except OSError as exc:
            raise _Retryable(f"{what}: the gateway at {self.url} cannot be reached: {exc}") from exc
        if status == 200 and isinstance(answer, dict):
            return got, answer
        said = answer.get("error", answer) if isinstance(answer, dict) else answer
        if status == 401:
            why = "with no token" if not self.token else "with this token"
            raise GatewayError(
                f"{what}: the gateway refused the call {why} (401: {said}); give --token or ${TOKEN_ENV}"
            )
        if status == 403:
            raise GatewayError(f"{what}: the token may not use {self.model} (403: {said})")
        if status == 404:
            raise GatewayError(f"{what}: the gateway knows no adapter {self.model!r} (404: {said})")
        error = _Retryable if status == 503 else GatewayError
        raise error(f"{what}: {status} {said}")


class _Retryable(GatewayError):
    """A call that changed nothing the client can see (503, no connection, a lost answer)."""
