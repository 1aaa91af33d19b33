"""The FastAPI application of a trainer pod: routes, error rendering, body limit, lifecycle.

``create_app`` wires one :class:`~lorafleet_trainer.service.serving.TrainerService` (engine, queue,
metrics) into one app. Every error leaves as ``lorafleet_api.wire.Error``, ``{"error": "<field>:
<message>", "field": "<field>"}`` (``field`` null where no one field is at fault), with the status
of its :class:`TrainerError` subclass, including the framework's own validation and routing
errors, so clients see a single error shape. The base model loads in the background on startup.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lorafleet_api import wire
from lorafleet_trainer import validating
from lorafleet_trainer.engine.holds import PUBLISH, PhaseHolds
from lorafleet_trainer.errors import QueueFull, TrainerError
from lorafleet_trainer.http import routes
from lorafleet_trainer.http.auth import BearerAuth
from lorafleet_trainer.http.limiting import BodyLimit
from lorafleet_trainer.learning.configs import TrainingSpec
from lorafleet_trainer.service.server_keys import ServerKey
from lorafleet_trainer.service.serving import ClientGone, Engine, TrainerService
from lorafleet_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

# How long app shutdown waits for a running step once uvicorn has stopped serving.
_STOP_WAIT_SECONDS = 30.0


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'samples', 0, 'feedback') -> 'samples[0].feedback'; ('path', 'name') -> 'name'."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    return validating.field_path(parts) or "body"


def _error(
    status: int, text: str, headers: dict[str, str] | None = None, field: str | None = None
) -> JSONResponse:
    body = wire.Error(error=f"{field}: {text}" if field else text, field=field)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, service: TrainerService) -> None:
    @app.exception_handler(TrainerError)
    async def trainer_error(_: Request, exc: TrainerError) -> JSONResponse:
        headers = None
        if isinstance(exc, QueueFull):
            headers = {"Retry-After": str(service.queue.retry_after_seconds())}
        if exc.status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(exc.status_code, exc.message, headers, exc.field)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "is invalid"}
        loc = tuple(first.get("loc", ("body",)))
        if first.get("type") == "json_invalid":
            loc = ("body",)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        msg = first.get("msg", "is invalid")
        if loc[0] == "path" and first.get("type") in ("string_pattern_mismatch", "string_too_long"):
            msg = "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', not at the ends"
        return _error(422, f"{msg}{more}", field=field_path(loc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 404:
            text = f"no route for {request.url.path}; adapters are /v1/adapters/<namespace>/<name>"
            return _error(404, text, headers, "path")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}", headers, "method")
        return _error(exc.status_code, str(exc.detail), headers, "request")

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> JSONResponse:
        # Nobody reads this answer; 499 (nginx's "client closed request") marks it in access logs.
        return _error(499, str(exc), field="request")


def build_engine(settings: TrainerSettings, holds: PhaseHolds | None = None) -> Engine:
    """The real engine for these settings (imports torch, so only when a server starts)."""
    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine

    config = EngineConfig(
        base_model=settings.base_model,
        storage_root=settings.storage,
        keep_versions=settings.keep_versions,
        step_token_budget=settings.step_token_budget,
        served_base_model_name=settings.served_base_model_name,
        cache_capacity_bytes=settings.cache_capacity,
        device=settings.device,
        gpu_residency=settings.gpu_residency,
        dtype=settings.dtype,
        model_cache_dir=settings.model_cache_dir,
        default_training=TrainingSpec(),
        step_holds=holds,
        durability=settings.durability,
        write_backlog=settings.write_backlog,
        fuse_max_adapters=settings.fuse_steps,
    )
    return TrainerEngine(config)


def create_app(settings: TrainerSettings, engine: Engine | None = None, token: str | None = None) -> FastAPI:
    """One trainer app; ``engine`` defaults to the real engine built from ``settings``."""
    holds = PhaseHolds(settings.test_hold_dir).enable() if settings.test_hold_dir is not None else None
    service = TrainerService(
        engine if engine is not None else build_engine(settings, holds),
        max_queue=settings.max_queue,
        fuse_steps=settings.fuse_steps,
        default_training=TrainingSpec(),
        max_generate_tokens=settings.max_generate_tokens,
        publish_hold=(lambda: holds.at(PUBLISH)) if holds is not None else None,
        server_key=(
            ServerKey(settings.serving_api_key_file, settings.serving_api_key_secret)
            if settings.serving_api_key_file is not None
            else None
        ),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        if not service.stop(_STOP_WAIT_SECONDS):
            log.warning("the running step did not finish within %.0f s of shutdown", _STOP_WAIT_SECONDS)

    app = FastAPI(
        title="LoraFleet trainer",
        version="1",
        summary="Continual LoRA training by self-distillation, many adapters on one base model.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.auth = BearerAuth(token)
    _install_error_handlers(app, service)
    app.include_router(routes.probes)
    app.include_router(routes.v1)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
