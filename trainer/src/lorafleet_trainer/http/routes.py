"""The HTTP routes of a trainer pod (DESIGN.md, "Trainer HTTP API"): thin adapters onto the service.

Each handler turns the path into an :class:`AdapterId`, calls :mod:`serving` (never the engine)
and returns the response model the service built; errors are raised as :class:`TrainerError` and
rendered once, by the app, as ``lorafleet_api.wire.Error``. Handlers that only read are
plain functions, which FastAPI runs in its thread pool, so they answer while a step runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lorafleet_api import adapters, fields, wire
from lorafleet_trainer.errors import NotReady
from lorafleet_trainer.http.auth import BearerAuth
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.service.serving import TrainerService

# Declared for the OpenAPI schema (securitySchemes); the check itself is BearerAuth's.
_bearer = HTTPBearer(auto_error=False, description="the token in --auth-token-file")

Namespace = Annotated[str, Path(pattern=adapters.DNS1123_LABEL, max_length=63, description="DNS-1123 label")]
Name = Annotated[str, Path(pattern=adapters.DNS1123_LABEL, max_length=63, description="DNS-1123 label")]
ServedNameQuery = Annotated[
    str | None,
    Query(
        **fields.bounds(fields.spec_field("LoraAdapter", "serving.name").schema),
        description="the adapter's served name",
    ),
]


def service(request: Request) -> TrainerService:
    svc: TrainerService = request.app.state.service
    return svc


def authorized(request: Request, _: Annotated[Any, Depends(_bearer)]) -> None:
    auth: BearerAuth = request.app.state.auth
    auth.check(request.headers.get("authorization"))


Service = Annotated[TrainerService, Depends(service)]


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """Resolves when the client hangs up, so a request still waiting in the queue is dropped."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": wire.Error} for code in (401, 404, 409, 413, 422, 429, 503, 507)
}

probes = APIRouter(tags=["probes"])
v1 = APIRouter(prefix="/v1", tags=["adapters"], dependencies=[Depends(authorized)], responses=_ERRORS)


@probes.get("/healthz", response_model=None)
def healthz(svc: Service) -> dict[str, str] | JSONResponse:
    """Liveness: the process serves requests and its base model did not fail to load."""
    if svc.load_error is not None:
        failed = wire.Error(error=f"base_model: failed to load: {svc.load_error}", field="base_model")
        return JSONResponse(failed.model_dump(mode="json"), status_code=500)
    return {"status": "ok"}


@probes.get("/readyz", response_model=None, responses={503: {"model": wire.Error}})
def readyz(svc: Service) -> dict[str, str] | JSONResponse:
    """Readiness: the base model is loaded and the pod is not shutting down."""
    try:
        svc.require_ready()
    except NotReady as exc:
        body = wire.Error(error=str(exc), field=exc.field)
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return {"status": "ready"}


@probes.get("/metrics", response_class=PlainTextResponse)
def metrics(svc: Service) -> Response:
    """Prometheus text exposition of this pod's metrics."""
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@v1.put(
    "/adapters/{namespace}/{name}",
    response_model=wire.AdapterState,
    status_code=200,
    responses={201: {"model": wire.AdapterState, "description": "created"}},
)
async def init_adapter(
    namespace: Namespace, name: Name, body: wire.InitRequest, svc: Service
) -> JSONResponse:
    """Create the stored adapter if absent (201), or confirm the same config (200); 409 otherwise."""
    state, created = await svc.init(AdapterId(namespace, name), body)
    return JSONResponse(state.model_dump(mode="json"), status_code=201 if created else 200)


@v1.get("/adapters/{namespace}/{name}", response_model=wire.AdapterState)
def get_adapter(namespace: Namespace, name: Name, svc: Service) -> wire.AdapterState:
    """The adapter's version, epoch, LoRA config and cache residency."""
    return svc.get(AdapterId(namespace, name))


@v1.post("/adapters/{namespace}/{name}/distill", response_model=wire.DistillResponse)
async def distill(
    namespace: Namespace, name: Name, body: wire.DistillRequest, request: Request, svc: Service
) -> wire.DistillResponse:
    """One SDPO step on the adapter, in its turn on the worker (429 past the queue bound)."""
    return await svc.distill(AdapterId(namespace, name), body, _disconnected(request))


@v1.post("/adapters/{namespace}/{name}/generate", response_model=wire.GenerateResponse)
async def generate(
    namespace: Namespace, name: Name, body: wire.GenerateRequest, request: Request, svc: Service
) -> wire.GenerateResponse:
    """Sample an answer with the adapter's current version, in its turn after queued steps."""
    return await svc.generate(AdapterId(namespace, name), body, _disconnected(request))


@v1.post("/generate", response_model=wire.GenerateResponse, tags=["base model"])
async def generate_base(body: wire.GenerateRequest, request: Request, svc: Service) -> wire.GenerateResponse:
    """Sample an answer with the bare base model (no adapter)."""
    return await svc.generate(None, body, _disconnected(request))


@v1.post("/adapters/{namespace}/{name}/rollouts", response_model=wire.RolloutsResponse)
async def rollouts(
    namespace: Namespace, name: Name, body: wire.RolloutsRequest, request: Request, svc: Service
) -> wire.RolloutsResponse:
    """Fresh answers of the adapter's current version, n per prompt, decoded as one batch; with
    ``feedback`` each comes with a distill sample ready to post."""
    return await svc.rollouts(AdapterId(namespace, name), body, _disconnected(request))


@v1.post("/rollouts", response_model=wire.RolloutsResponse, tags=["base model"])
async def rollouts_base(body: wire.RolloutsRequest, request: Request, svc: Service) -> wire.RolloutsResponse:
    """The same with the bare base model."""
    return await svc.rollouts(None, body, _disconnected(request))


@v1.post("/adapters/{namespace}/{name}/score", response_model=wire.ScoreResponse)
async def score(
    namespace: Namespace, name: Name, body: wire.ScoreRequest, request: Request, svc: Service
) -> wire.ScoreResponse:
    """The log-probability of each token of a given answer under the adapter's current version."""
    return await svc.score(AdapterId(namespace, name), body, _disconnected(request))


@v1.post("/score", response_model=wire.ScoreResponse, tags=["base model"])
async def score_base(body: wire.ScoreRequest, request: Request, svc: Service) -> wire.ScoreResponse:
    """The same with the bare base model."""
    return await svc.score(None, body, _disconnected(request))


@v1.post("/adapters/{namespace}/{name}/teacher", response_model=wire.TeacherResponse)
async def teacher(
    namespace: Namespace, name: Name, body: wire.TeacherRequest, request: Request, svc: Service
) -> wire.TeacherResponse:
    """Before training: the teacher's greedy answer to the messages with the feedback (the adapter's
    template), its top tokens at the first positions, and the student's beside them."""
    return await svc.teacher(AdapterId(namespace, name), body, _disconnected(request))


@v1.post("/teacher", response_model=wire.TeacherResponse, tags=["base model"])
async def teacher_base(body: wire.TeacherRequest, request: Request, svc: Service) -> wire.TeacherResponse:
    """The same with the base model as the student and the trainer's default template."""
    return await svc.teacher(None, body, _disconnected(request))


@v1.delete("/adapters/{namespace}/{name}/cache", response_model=wire.Evicted)
async def evict_adapter(namespace: Namespace, name: Name, svc: Service) -> wire.Evicted:
    """Drop the adapter from the CPU cache (idempotent); its stored state stays."""
    return await svc.evict(AdapterId(namespace, name))


@v1.delete("/adapters/{namespace}/{name}", response_model=wire.Deleted)
async def delete_adapter(namespace: Namespace, name: Name, svc: Service) -> wire.Deleted:
    """Delete the stored adapter and its cache entry."""
    return await svc.delete(AdapterId(namespace, name))


@v1.get(
    "/adapters/{namespace}/{name}/export",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "a PEFT adapter as a zip"}},
)
def export_adapter(
    namespace: Namespace,
    name: Name,
    svc: Service,
    version: Annotated[int | None, Query(ge=0, description="a kept version (default: the latest)")] = None,
) -> Response:
    """A zip of adapter_config.json and adapter_model.safetensors, loadable by PEFT and vLLM."""
    adapter = AdapterId(namespace, name)
    data = svc.export(adapter, version)
    suffix = "" if version is None else f"-v{version}"
    filename = f"{adapter.namespace}-{adapter.name}{suffix}.zip"
    return Response(
        data,
        media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


@v1.delete("/adapters/{namespace}/{name}/serving", response_model=wire.Unpublished)
def unpublish_adapter(
    namespace: Namespace, name: Name, svc: Service, served_name: ServedNameQuery = None
) -> wire.Unpublished:
    """Unload the adapter from every inference server and stop publishing it; waits a few seconds
    and answers what each server said (failed unloads keep being retried). ``served_name``: for an
    adapter this pod does not publish (the pod that did is gone), the name to unload wherever it
    was loaded from this adapter's files."""
    return svc.unpublish(AdapterId(namespace, name), served_name)


@v1.get("/changes", response_model=wire.Changes)
async def changes(
    svc: Service,
    since: Annotated[int, Query(ge=0, description="the seq of the follower's last answer (0: none)")] = 0,
    instance: Annotated[str | None, Query(max_length=64, description="the instance of that answer")] = None,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for a change")] = 0,
) -> wire.Changes:
    """The adapters whose state changed (a commit, an init, what a server serves) since the
    follower's last answer, waiting up to ``wait`` seconds for one: the operator follows each
    commit with it. A follower of another instance (this trainer restarted) starts afresh."""
    return await svc.changed(since, instance, wait)


@v1.put("/serving", response_model=wire.ServingState, tags=["serving"])
def set_serving(body: wire.ServingRequest, svc: Service) -> wire.ServingState:
    """The pool's inference servers and the adapters this pod owns, as the operator sees them."""
    return svc.set_serving(body)


@v1.get("/serving", response_model=wire.ServingState, tags=["serving"])
def serving(svc: Service) -> wire.ServingState:
    """The servers this pod publishes to, the store's root as they see it, and the lag."""
    return svc.serving()


@v1.get("/cache", response_model=wire.CacheState)
def cache(svc: Service) -> wire.CacheState:
    """The CPU cache: capacity, bytes used, and one entry per cached adapter."""
    return svc.cache()
