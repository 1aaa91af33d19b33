"""The gateway's HTTP routes: chat and completions routed by adapter, models, and feedback.

Errors leave as ``lorafleet_api.wire.Error`` (``{"error": "<field>: <message>", "field": ...}``),
so a client of the trainers and of the gateway reads one shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from lorafleet_api import wire
from lorafleet_gateway import claas, routing
from lorafleet_gateway.directory import Adapter, Directory
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.records import Completion, Records
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_gateway.tenancy import Refused, Tokens

VERSION_HEADER = "X-LoraFleet-Adapter-Version"
ADAPTER_HEADER = "X-LoraFleet-Adapter"
LATEST_HEADER = "X-LoraFleet-Latest"
RETRY_SECONDS = "1"


class Failure(Exception):
    """An error answer: HTTP ``status``, the ``field`` at fault (or None) and what was wrong."""

    def __init__(self, status: int, message: str, field: str | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.retry = status, message, field, retry


def _error(exc: Failure) -> JSONResponse:
    body = wire.Error(error=f"{exc.field}: {exc.message}" if exc.field else exc.message, field=exc.field)
    headers = {"Retry-After": RETRY_SECONDS} if exc.retry else None
    return JSONResponse(body.model_dump(mode="json"), status_code=exc.status, headers=headers)


def _invalid(exc: ValidationError, prefix: str = "") -> Failure:
    first = exc.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    return Failure(422, first["msg"], f"{prefix}{loc}" or "body")


@dataclass
class Gateway:
    settings: GatewaySettings
    directory: Directory
    tokens: Tokens
    records: Records
    metrics: GatewayMetrics
    trainers: httpx.AsyncClient
    servers: httpx.AsyncClient

    # ---- finding the adapter -----------------------------------------------------------------

    async def resolve(self, model: str, allowed: set[str] | None, field: str = "model") -> Adapter:
        """The adapter ``model`` names (chat's ``model``, feedback's ``lora_id``: ``field``)."""
        known = await self.directory.adapters()
        if "/" in model:
            found = [a for a in known if a.key == model]
        else:
            found = [a for a in known if a.served_name == model]
        if not found:
            raise Failure(404, f"no adapter is named {model!r} (a served name or namespace/adapter)", field)
        mine = [a for a in found if allowed is None or a.namespace in allowed]
        if not mine:
            Tokens.check(allowed, found[0].namespace, field)
        if len(mine) > 1:
            names = ", ".join(sorted(a.key for a in mine))
            raise Failure(
                409, f"{model!r} is served in several namespaces ({names}): name namespace/adapter", field
            )
        return mine[0]

    async def state(self, adapter: Adapter) -> wire.AdapterState:
        """The adapter's state from its trainer; the directory is read again once on a miss."""
        for attempt in range(2):
            if adapter.endpoint is not None:
                try:
                    r = await self.trainers.get(
                        f"{adapter.endpoint}/v1/adapters/{adapter.namespace}/{adapter.name}"
                    )
                    if r.status_code == 200:
                        return wire.AdapterState.model_validate_json(r.content)
                except (httpx.TransportError, ValidationError):
                    pass
            if attempt == 0:
                await self.directory.refresh()
                adapter = next((a for a in await self.directory.adapters() if a.key == adapter.key), adapter)
        raise Failure(503, f"{adapter.key} has no trainer that answers right now", "model", retry=True)

    async def choose(self, adapter: Adapter) -> routing.Choice:
        deadline = time.monotonic() + self.settings.latest_wait_seconds
        while True:
            state = await self.state(adapter)
            latest = routing.choose(state, adapter.servers, latest_only=True)
            if latest is not None:
                self.metrics.routing.labels(decision="latest").inc()
                return latest
            if time.monotonic() >= deadline:
                older = routing.choose(state, adapter.servers, latest_only=False)
                if older is None:
                    self.metrics.routing.labels(decision="none").inc()
                    raise Failure(503, f"no inference server serves {adapter.key} yet", "model", retry=True)
                self.metrics.routing.labels(decision="older").inc()
                return older
            await asyncio.sleep(0.05)
            await self.directory.refresh()
            adapter = next((a for a in await self.directory.adapters() if a.key == adapter.key), adapter)

    # ---- chat ----------------------------------------------------------------------------------

    async def complete(self, request: Request, route: str) -> Response:
        allowed = self.tokens.namespaces(request.headers.get("authorization"))
        try:
            body = await request.json()
        except ValueError:
            raise Failure(400, "is not JSON", "body") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            raise Failure(422, "must name a model (an adapter's served name or namespace/adapter)", "model")
        adapter = await self.resolve(body["model"], allowed)
        request.state.model = adapter.key
        server_auth = _server_auth(adapter)
        choice = await self.choose(adapter)
        headers = {
            VERSION_HEADER: str(choice.version),
            ADAPTER_HEADER: adapter.key,
            LATEST_HEADER: "true" if choice.is_latest else "false",
        }
        upstream = {**body, "model": adapter.served_name}
        url = f"{choice.url}/v1/{route}"
        if body.get("stream"):
            return await self._stream(url, upstream, headers, server_auth, adapter, choice.server)
        asked_logprobs, asked_ids = body.get("logprobs"), body.get("return_token_ids")
        if route == "chat/completions":
            upstream |= {"logprobs": True, "return_token_ids": True}
        started = time.perf_counter()
        try:
            # Only the server's own key goes upstream: the client's Authorization (its gateway
            # token) is never passed on.
            r = await self.servers.post(url, json=upstream, headers=server_auth)
        except httpx.TransportError as exc:
            await self.directory.refresh()
            raise Failure(
                503, f"the server {choice.server} did not answer: {exc!r}", "model", retry=True
            ) from exc
        self.metrics.upstream_seconds.labels(route=route).observe(time.perf_counter() - started)
        _check_key_accepted(r.status_code, adapter, choice.server)
        if r.status_code != 200:
            return Response(
                r.content, status_code=r.status_code, media_type="application/json", headers=headers
            )
        answer = r.json()
        if route == "chat/completions":
            self._record(adapter, choice.version, answer)
            _strip(answer, logprobs=bool(asked_logprobs), token_ids=bool(asked_ids))
        return JSONResponse(answer, headers=headers)

    async def _stream(
        self,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        server_auth: dict[str, str],
        adapter: Adapter,
        server: str,
    ) -> Response:
        request = self.servers.build_request("POST", url, json=body, headers=server_auth)
        try:
            upstream = await self.servers.send(request, stream=True)
        except httpx.TransportError as exc:
            raise Failure(503, f"the server did not answer: {exc!r}", "model", retry=True) from exc
        if upstream.status_code in (401, 403):
            await upstream.aclose()
            _check_key_accepted(upstream.status_code, adapter, server)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        media = upstream.headers.get("content-type", "text/event-stream")
        return StreamingResponse(
            chunks(), status_code=upstream.status_code, media_type=media, headers=headers
        )

    def _record(self, adapter: Adapter, version: int, answer: dict[str, Any]) -> None:
        prompt_ids = answer.get("prompt_token_ids")
        for choice in answer.get("choices") or []:
            message = choice.get("message") or {}
            content = (choice.get("logprobs") or {}).get("content") or []
            ids = choice.get("token_ids")
            if not (isinstance(prompt_ids, list) and isinstance(ids, list) and content and ids):
                continue
            logprobs = [min(0.0, float(t.get("logprob", 0.0))) for t in content]
            if len(logprobs) != len(ids):
                continue
            self.records.add(
                Completion(
                    completion_id=f"{answer.get('id', uuid.uuid4().hex)}:{choice.get('index', 0)}",
                    namespace=adapter.namespace,
                    name=adapter.name,
                    version=version,
                    prompt_token_ids=list(prompt_ids),
                    response_token_ids=list(ids),
                    response_logprobs=logprobs,
                    text=str(message.get("content") or ""),
                )
            )

    # ---- feedback ------------------------------------------------------------------------------

    async def feedback(self, request: Request) -> dict[str, Any]:
        arrived = time.perf_counter()
        allowed = self.tokens.namespaces(request.headers.get("authorization"))
        try:
            body = await request.json()
        except ValueError:
            raise Failure(400, "is not JSON", "body") from None
        try:
            feedback = claas.Feedback.parse(body, request.headers.get("idempotency-key"))
        except ValidationError as exc:
            raise _invalid(exc) from None
        except claas.KeyConflict as exc:
            raise Failure(422, str(exc), "idempotency_key") from None
        items = feedback.items
        # The client's key, or one of the gateway's own: a retry of a step whose answer was lost
        # (the trainer went away mid-step) is then answered, not applied twice.
        key = feedback.idempotency_key or uuid.uuid4().hex
        groups: dict[str, tuple[Adapter, list[tuple[int, claas.FeedbackItem]]]] = {}
        for i, item in enumerate(items):
            adapter = await self.resolve(item.lora_id, allowed, f"{feedback.where(i)}lora_id")
            if not groups:
                request.state.model = adapter.key  # a batch over several adapters counts as its first
            groups.setdefault(adapter.key, (adapter, []))[1].append((i, item))
        # Every group's samples and training are built before any step: bad input changes nothing.
        plans = [await self._plan(adapter, group, key) for adapter, group in groups.values()]
        results = [await self._step(*plan) for plan in plans]
        self.metrics.feedback_seconds.observe(time.perf_counter() - arrived)
        first = results[0]
        return {
            "status": "ok",
            "request_id": uuid.uuid4().hex,
            "lora_id": first["lora_id"],
            "version": first["version"],
            "distill_result": first["distill_result"],
            # The first step's phases; total is this whole request (each step's own in its result).
            "timing_ms": {**first["timing_ms"], "total": round((time.perf_counter() - arrived) * 1000, 1)},
            "batch_size": len(items),
            "results": results,
        }

    async def _plan(
        self, adapter: Adapter, group: Sequence[tuple[int, claas.FeedbackItem]], key: str
    ) -> tuple[Adapter, wire.DistillRequest, list[str]]:
        samples, sources, training = [], [], None
        for i, item in group:
            where = f"requests[{i}]." if len(group) > 1 or i else ""
            if item.training is not None:
                try:
                    training = item.training.overrides()
                except ValidationError as exc:
                    raise _invalid(exc, f"{where}training.") from None
            found = self.records.find(completion_id=item.completion_id) if item.completion_id else None
            found = found or self.records.find(text=item.response)
            if found is not None and (found.namespace, found.name) == (adapter.namespace, adapter.name):
                self.metrics.records.labels(result="hit").inc()
                sources.append(f"record:{found.version}")
                ids, response_ids, logprobs = (
                    found.prompt_token_ids,
                    found.response_token_ids,
                    found.response_logprobs,
                )
            else:
                self.metrics.records.labels(result="miss").inc()
                score = await self._score(adapter, item)
                sources.append(f"scored:{score.version}")
                ids, response_ids, logprobs = score.prompt_token_ids, score.token_ids, score.logprobs
            samples.append(
                wire.Sample(
                    prompt=item.prompt,
                    response=item.response,
                    feedback=item.feedback,
                    response_logprobs=[min(0.0, x) for x in logprobs],
                    prompt_token_ids=ids,
                    response_token_ids=response_ids,
                    user_prompt=item.prompt,
                    system_prompt="",
                    demonstration="",
                )
            )
        step = wire.DistillRequest(
            samples=samples,
            training=training,
            idempotency_key=f"{key}@{adapter.key}",
            # The samples' log-probs depend on the record or the version scored; a retry's may differ.
            request_digest=claas.digest(adapter.key, [item for _, item in group]),
        )
        return adapter, step, sources

    async def _score(self, adapter: Adapter, item: claas.FeedbackItem) -> wire.ScoreResponse:
        body = {"messages": [{"role": "user", "content": item.prompt}], "response": item.response}
        r = await self._trainer("POST", adapter, "/score", body)
        return wire.ScoreResponse.model_validate_json(r.content)

    async def _step(self, adapter: Adapter, body: wire.DistillRequest, sources: list[str]) -> dict[str, Any]:
        payload = body.model_dump(mode="json", exclude_none=True)
        r = await self._trainer("POST", adapter, "/distill", payload, keyed=True)
        step = wire.DistillResponse.model_validate_json(r.content)
        if step.replayed:
            self.metrics.feedback_replayed.inc()
        return {
            "lora_id": adapter.key,
            "version": step.version,
            "replayed": step.replayed,
            "artifact": step.artifact,
            "samples": sources,
            "distill_result": {"lora_id": adapter.key, "metadata": step.metrics},
            "timing_ms": step.timing_ms.model_dump(),
        }

    async def _trainer(
        self, method: str, adapter: Adapter, suffix: str, body: Any, keyed: bool = False
    ) -> httpx.Response:
        """A call to the adapter's trainer. Refusals that prove nothing was applied (a trainer that
        does not know the adapter, is not ready, or cannot be connected to) read the directory again
        and follow the adapter once; so does a call with an idempotency key (``keyed``) whose answer
        was lost, since its retry cannot apply twice. Any other failure is answered as it is."""
        lost: type[httpx.TransportError] = httpx.TransportError if keyed else httpx.ConnectError
        for attempt in range(2):
            if adapter.endpoint is None:
                raise Failure(503, f"{adapter.key} is not placed on a trainer yet", "lora_id", retry=True)
            url = f"{adapter.endpoint}/v1/adapters/{adapter.namespace}/{adapter.name}{suffix}"
            started = time.perf_counter()
            try:
                r = await self.trainers.request(method, url, json=body)
            except lost:
                r = None
            self.metrics.upstream_seconds.labels(route=suffix.strip("/")).observe(
                time.perf_counter() - started
            )
            if r is not None and r.status_code == 200:
                return r
            moved = r is None or r.status_code in (404, 503)
            if moved and attempt == 0:
                await self.directory.refresh()
                adapter = next((a for a in await self.directory.adapters() if a.key == adapter.key), adapter)
                continue
            if r is None:
                raise Failure(503, f"the trainer of {adapter.key} cannot be reached", "lora_id", retry=True)
            try:
                error = wire.Error.model_validate_json(r.content)
            except ValidationError:
                error = wire.Error(error=r.text, field=None)
            raise Failure(
                r.status_code,
                f"the trainer refused: {error.error}",
                error.field,
                retry=r.status_code in (429, 503),
            )
        raise AssertionError("unreachable")

    # ---- models --------------------------------------------------------------------------------

    async def models(self, request: Request) -> dict[str, Any]:
        allowed = self.tokens.namespaces(request.headers.get("authorization"))
        known = await self.directory.adapters()
        cards = [
            {"id": a.served_name, "object": "model", "owned_by": a.namespace, "adapter": a.key}
            for a in known
            if allowed is None or a.namespace in allowed
        ]
        return {"object": "list", "data": cards}


def _server_auth(adapter: Adapter) -> dict[str, str]:
    """The header that carries the key the adapter's servers require; a key that cannot be had
    is answered here, naming its Secret, rather than left to the server's bare refusal."""
    key = adapter.server_key
    if key is None:
        return {}
    if key.value is None:
        raise Failure(
            503,
            f"the inference servers of {adapter.key} require an API key (spec.serving.apiKeySecretRef "
            f"of its pool), but the {key.problem}",
            "model",
        )
    return {"Authorization": f"Bearer {key.value}"}


def _check_key_accepted(status: int, adapter: Adapter, server: str) -> None:
    """A server's 401/403 is the gateway's key being refused, not the client's token: a 502 that
    says which key (the client's own Authorization is never sent upstream)."""
    if status not in (401, 403):
        return
    key = adapter.server_key
    why = (
        f"refused the gateway's API key, the {key.secret} (spec.serving.apiKeySecretRef of its pool)"
        if key is not None
        else "requires an API key: name its Secret in the pool's spec.serving.apiKeySecretRef"
    )
    raise Failure(502, f"the inference server {server} of {adapter.key} {why}", "model")


def _strip(answer: dict[str, Any], *, logprobs: bool, token_ids: bool) -> None:
    """Take out of ``answer`` what the gateway asked the server for and the client did not."""
    if not token_ids:
        answer.pop("prompt_token_ids", None)
    for choice in answer.get("choices") or []:
        if not logprobs:
            choice["logprobs"] = None
        if not token_ids:
            choice.pop("token_ids", None)


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="LoraFleet gateway")

    @app.exception_handler(Failure)
    async def failed(_: Request, exc: Failure) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        field = "Authorization" if exc.status == 401 else exc.field
        text = exc.message.split(": ", 1)[-1]
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        body = wire.Error(error=f"{field}: {text}", field=field)
        return JSONResponse(body.model_dump(mode="json"), status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        # The matched route's template, not the path: a scan of made-up paths adds no series. The
        # model is the adapter the request resolved to, so only adapters that exist become labels.
        def counted(code: int) -> None:
            template = getattr(request.scope.get("route"), "path", None)
            gateway.metrics.requests.labels(
                route=template if isinstance(template, str) else "unmatched",
                model=getattr(request.state, "model", ""),
                code=str(code),
            ).inc()

        try:
            response: Response = await call_next(request)
        except Exception:
            counted(500)  # what the server answers for an exception no handler took
            raise
        counted(response.status_code)
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return await gateway.models(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await gateway.complete(request, "chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.complete(request, "completions")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        return await gateway.feedback(request)

    return app


def build(settings: GatewaySettings, directory: Directory, metrics: GatewayMetrics | None = None) -> Gateway:
    token = settings.trainer_token_file.read_text().strip() if settings.trainer_token_file else None
    timeout = httpx.Timeout(settings.upstream_timeout_seconds)
    return Gateway(
        settings=settings,
        directory=directory,
        tokens=Tokens.load(settings.tokens_file),
        records=Records(settings.record_max_bytes, settings.record_ttl_seconds),
        metrics=metrics or GatewayMetrics(),
        trainers=httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=timeout
        ),
        servers=httpx.AsyncClient(timeout=timeout),
    )
