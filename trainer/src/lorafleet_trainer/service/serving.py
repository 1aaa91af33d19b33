"""The trainer service: the engine behind one step queue, its readiness, and its step metrics.

Routes stay thin: they call this layer only, and it answers with the wire models of
``lorafleet_api.wire``, built once from the engine's typed results (``responses``). Writes and
sampling go through the single-worker queue, so each adapter's requests keep their arrival order
(a generate sees every step posted before it); reads go straight to the engine from the thread
pool so they never wait behind a long step. A distill or generate whose client disconnects while
it still waits is cancelled: it either completes or never starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from lorafleet_api import wire
from lorafleet_trainer.errors import (
    AdapterNotFound,
    ConfigConflict,
    InvalidInput,
    NotReady,
    QueueFull,
)
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning import sampling
from lorafleet_trainer.learning.configs import LoraSpec, Overrides, TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample, parse_samples
from lorafleet_trainer.results import (
    AdapterRecord,
    EngineStats,
    Generation,
    InitResult,
    Scored,
    StepKey,
    StepRequest,
    StepResult,
    TeacherPreview,
)
from lorafleet_trainer.service import publishing, responses, server_keys
from lorafleet_trainer.service.changes import Changes
from lorafleet_trainer.service.metrics import TrainerMetrics
from lorafleet_trainer.service.queueing import Job, StepQueue, Together

if TYPE_CHECKING:  # it imports torch, which the service itself never loads
    from lorafleet_trainer.engine.cache import CacheInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine(Protocol):
    """The part of ``engine.TrainerEngine`` the service uses (kept structural for unit tests)."""

    @property
    def ready(self) -> bool: ...
    def load(self) -> None: ...
    def init_adapter(
        self, adapter: AdapterId, lora: LoraSpec, epoch: int, training: TrainingSpec | None
    ) -> InitResult: ...
    def get_adapter(self, adapter: AdapterId) -> AdapterRecord: ...
    def distill(
        self,
        adapter: AdapterId,
        samples: Sequence[DistillSample],
        training: Overrides,
        key: StepKey | None = None,
    ) -> StepResult: ...
    def distill_many(self, requests: Sequence[StepRequest]) -> list[StepResult | Exception]: ...
    def generate(
        self, adapter: AdapterId | None, prompt: sampling.Prompt, params: sampling.SamplingParams
    ) -> Generation: ...
    def rollouts(
        self,
        adapter: AdapterId | None,
        prompts: Sequence[sampling.Prompt],
        params: Sequence[sampling.SamplingParams],
    ) -> list[Generation]: ...
    def score(
        self, adapter: AdapterId | None, prompt: sampling.Prompt, response: Sequence[int] | str
    ) -> Scored: ...
    def teacher_preview(
        self,
        adapter: AdapterId | None,
        prompt: sampling.Prompt,
        feedback: str,
        training: Overrides,
        max_tokens: int,
        top: int,
    ) -> TeacherPreview: ...
    def evict(self, adapter: AdapterId) -> bool: ...
    def delete(self, adapter: AdapterId) -> bool: ...
    def pin(self, adapter: AdapterId, pinned: bool) -> None: ...
    def export_zip(self, adapter: AdapterId, version: int | None = None) -> bytes: ...
    def cache_info(self) -> CacheInfo: ...
    def stats(self) -> EngineStats: ...
    @property
    def store_root(self) -> PathLike[str]: ...
    def pin_versions(self, pinned: Callable[[AdapterId], Collection[int]]) -> None: ...
    def watch_durable(self, fn: Callable[[AdapterId, int, str], None]) -> None: ...
    def close(self, timeout: float | None = None) -> bool: ...


class ClientGone(Exception):
    """The client disconnected while its step was still waiting; the step was dropped."""


def outcome_of(exc: BaseException) -> str:
    """The ``steps_total{outcome}`` label for a failed distill request."""
    if isinstance(exc, (InvalidInput, AdapterNotFound, ConfigConflict)):
        return "invalid"
    if isinstance(exc, QueueFull):
        return "rejected"
    if isinstance(exc, NotReady):
        return "unavailable"
    if isinstance(exc, ClientGone):
        return "cancelled"
    return "error"


class TrainerService:
    """Owns the engine's lifecycle (background load, graceful stop) and its step queue."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int,
        default_training: TrainingSpec,
        fuse_steps: int = 1,
        max_generate_tokens: int = 512,
        publish_hold: Callable[[], None] | None = None,
        server_key: server_keys.ServerKey | None = None,
    ) -> None:
        self.engine = engine
        self.default_training = default_training
        self.max_generate_tokens = max_generate_tokens
        # Distill steps waiting together run as one engine call (fused per LoRA shape), up to this.
        self.queue = StepQueue(max_queue, max_together=fuse_steps)
        self.metrics = TrainerMetrics(engine, lambda: self.queue.depth, lambda: self.queue.busy)
        # The servers find the store where this trainer keeps it unless the operator names another
        # mount (PUT /v1/serving); the publisher keeps that root and joins it to each artifact.
        # Every call to a server carries the key it requires, read from its file at that moment.
        api_key = server_key.read if server_key is not None else None
        self.publisher = publishing.Publisher(
            self.metrics.publish_observer(),
            store_root=str(engine.store_root),
            client=lambda url: publishing.ServerClient(url, api_key=api_key),
            hold=publish_hold,
        )
        self.metrics.watch_publishing(self.publisher)
        self.changes = Changes()  # what the operator follows (GET /v1/changes)
        self.publisher.on_change = self.changes.mark
        engine.pin_versions(self.publisher.loading_versions)
        # Durability async: a version is published once the background writer made it durable.
        engine.watch_durable(self._durable)
        self.load_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader = threading.Thread(target=self._load, name="lorafleet-load", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and load the base model in the background (``/readyz`` waits for it)."""
        self._loop = asyncio.get_running_loop()
        self.queue.start()
        self._loader.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.engine.load()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the base model failed")
            return
        log.info("base model loaded in %.1f s", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self.load_error is None and not self.queue.closed and bool(self.engine.ready)

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise NotReady(f"the base model failed to load: {self.load_error}")
        if self.queue.closed:
            raise NotReady("the trainer is shutting down; retry on another pod")
        if not self.engine.ready:
            raise NotReady("the base model is still loading")

    def begin_shutdown(self) -> None:
        """Stop taking writes and fail the waiting ones; the running step still completes."""
        dropped = self.queue.close()
        log.info("shutting down: %d waiting writes refused; finishing the running step", dropped)

    def begin_shutdown_threadsafe(self) -> None:
        """The same, callable from a signal handler: it runs on the event loop, not in the handler."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_shutdown)
        else:
            self.begin_shutdown()

    def stop(self, timeout: float) -> bool:
        """Close the queue and wait up to ``timeout`` s for the running step; True when it ended."""
        self.queue.close()
        ended = self.queue.join(timeout)
        # Durability async: every committed version is written before the process exits.
        if not self.engine.close(timeout):
            log.error("shutting down with committed versions that are not durable")
        self.publisher.close()
        return ended

    def _durable(self, adapter: AdapterId, version: int, artifact: str) -> None:
        self.publisher.committed(adapter, version, artifact)
        self.changes.mark(adapter)

    # ---- reads (straight to the engine, from the thread pool) -------------------------------

    def get(self, adapter: AdapterId) -> wire.AdapterState:
        return self._state(self.engine.get_adapter(adapter))

    def _state(self, state: AdapterRecord) -> wire.AdapterState:
        answer = responses.adapter_state(state)
        answer.served_name = self.publisher.served_name(state.adapter)
        answer.served = [wire.ServedVersion(**s) for s in self.publisher.state(state.adapter)]
        return answer

    async def changed(self, since: int, instance: str | None, wait: float) -> wire.Changes:
        """The adapters whose state changed after ``since`` (waiting up to ``wait`` s for one)."""
        seq, adapters = await self.changes.after(since, instance, wait)
        # From the thread pool, as the other reads: a state not in memory is read from storage.
        states = await asyncio.to_thread(self._current, adapters)
        return wire.Changes(instance=self.changes.instance, seq=seq, adapters=states)

    def _current(self, adapters: Sequence[AdapterId]) -> list[wire.AdapterState]:
        """The states of ``adapters``, less those deleted since."""
        states = []
        for adapter in adapters:
            try:
                states.append(self.get(adapter))
            except AdapterNotFound:
                continue
        return states

    def serving(self) -> wire.ServingState:
        versions, seconds = self.publisher.lag()
        return wire.ServingState(
            servers=[s.name for s in self.publisher.servers],
            adapter_root=self.publisher.adapter_root,
            lag_versions=versions,
            lag_seconds=seconds,
        )

    def set_serving(self, body: wire.ServingRequest) -> wire.ServingState:
        """The operator's view of the pool's servers and this pod's adapters (idempotent); without
        ``adapter_root`` the servers find the store where this trainer keeps it."""
        self.require_ready()
        # Before the servers: a worker that starts now loads from this root at its first pass.
        self.publisher.set_adapter_root(body.adapter_root)
        for owned in body.adapters:
            adapter = AdapterId(owned.namespace, owned.name)
            try:
                state = self.engine.get_adapter(adapter)
            except AdapterNotFound:
                continue  # not initialised anywhere yet: its init names it
            self.publisher.own(adapter, owned.served_name, state.durable, state.artifact)
        self.publisher.set_servers([publishing.Server(s.name, s.url) for s in body.servers])
        return self.serving()

    def unpublish(self, adapter: AdapterId, served_name: str | None = None) -> wire.Unpublished:
        """Unload the adapter from every server and stop publishing it (waits a few seconds);
        ``served_name``: unload that name even if this pod never published the adapter."""
        return wire.Unpublished(servers=self.publisher.disown(adapter, served_name=served_name))

    def export(self, adapter: AdapterId, version: int | None = None) -> bytes:
        """A kept committed version (default: the latest) as a PEFT zip."""
        return self.engine.export_zip(adapter, version)

    def cache(self) -> wire.CacheState:
        return responses.cache_state(self.engine.cache_info())

    # ---- writes (through the queue) ----------------------------------------------------------

    async def write(self, fn: Callable[[], T]) -> T:
        """Run a control write (init, evict, delete) in its turn; these do not count to the bound."""
        job = self.queue.submit(fn, bounded=False)
        return await asyncio.wrap_future(job.future)

    async def evict(self, adapter: AdapterId) -> wire.Evicted:
        return wire.Evicted(evicted=await self.write(lambda: self.engine.evict(adapter)))

    async def delete(self, adapter: AdapterId) -> wire.Deleted:
        await asyncio.to_thread(self.publisher.disown, adapter)
        deleted = await self.write(lambda: self.engine.delete(adapter))
        self.changes.forget(adapter)
        return wire.Deleted(deleted=deleted)

    async def init(self, adapter: AdapterId, body: wire.InitRequest) -> tuple[wire.AdapterState, bool]:
        """The adapter's state after init, and whether init created it."""
        self.require_ready()
        lora = LoraSpec.of(body.lora)
        training = None
        if body.training is not None:
            training = self.default_training.merged(body.training)
        pinned = body.cache.pinned if body.cache is not None else None

        def run() -> InitResult:
            result = self.engine.init_adapter(adapter, lora, body.epoch, training)
            if pinned is not None:
                self.engine.pin(adapter, pinned)
            return result

        result = await self.write(run)
        if body.serving is not None:
            self.publisher.own(adapter, body.serving.name, result.state.durable, result.state.artifact)
        self.changes.mark(adapter)
        return self._state(result.state), result.created

    def _after_step(self, adapter: AdapterId, done: StepResult) -> None:
        """On the worker, right after the commit: the servers start loading the new version now
        (durability async: once it is durable, from the writer's report)."""
        if not done.replayed:
            if done.durable >= done.version:
                self.publisher.committed(adapter, done.version, done.artifact)
            self.changes.mark(adapter)

    def _run_steps(self, requests: Sequence[StepRequest]) -> list[StepResult | Exception]:
        """Distill steps that waited together, as one engine call (fused where shapes allow); each
        request gets its own result or error."""
        outcomes = self.engine.distill_many(requests)
        for i, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
            if isinstance(outcome, StepResult):
                try:
                    self._after_step(request.adapter, outcome)
                except Exception as exc:  # as a single step's would, it fails that request only
                    outcomes[i] = exc
        return outcomes

    async def distill(
        self, adapter: AdapterId, body: wire.DistillRequest, disconnected: Callable[[], Awaitable[None]]
    ) -> wire.DistillResponse:
        accepted = time.perf_counter()
        try:
            self.require_ready()
            samples = parse_samples([s.model_dump(exclude_none=True) for s in body.samples])
            training = body.training
            # Checked now so a bad value is refused at once instead of after a wait in the queue.
            self.default_training.merged(training)

            key = None
            if body.idempotency_key is not None:
                digest = (
                    body.request_digest
                    or hashlib.sha256(
                        body.model_dump_json(exclude={"idempotency_key", "request_digest"}).encode()
                    ).hexdigest()
                )
                key = StepKey(body.idempotency_key, digest)

            def step() -> StepResult:
                done = self.engine.distill(adapter, samples, training, key)
                self._after_step(adapter, done)
                return done

            request = StepRequest(adapter, samples, training, key)
            job = self.queue.submit(step, together=Together("distill", adapter, request, self._run_steps))
            result = await self._wait(job, disconnected)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.metrics.count_outcome(outcome_of(exc))
            raise
        cache: Literal["hit", "miss"] = "hit" if result.cache_hit else "miss"
        phases = {k: float(v) for k, v in dict(result.timing_ms).items()}
        phases["queue"] = job.queue_seconds * 1000.0
        if result.replayed:
            self.metrics.count_outcome("replayed")
        else:
            self.metrics.observe_step(cache, job.run_seconds, phases, result.fused_adapters)
        timing = wire.StepTiming(
            queue=phases["queue"],
            restore=phases.get("restore", 0.0),
            compute=phases.get("compute", 0.0),
            snapshot=phases.get("snapshot", 0.0),
            persist=phases.get("persist", 0.0),
            total=(time.perf_counter() - accepted) * 1000.0,
        )
        metrics = {k: float(v) for k, v in dict(result.metrics).items()}
        return wire.DistillResponse(
            version=result.version,
            artifact=result.artifact,
            durable_version=result.durable,
            cache=cache,
            metrics=metrics,
            timing_ms=timing,
            replayed=result.replayed,
        )

    async def generate(
        self,
        adapter: AdapterId | None,
        body: wire.GenerateRequest,
        disconnected: Callable[[], Awaitable[None]],
    ) -> wire.GenerateResponse:
        """Sample with the adapter's current version (the base model when ``adapter`` is None).

        It waits its turn behind the writes already queued, so it answers with every step posted
        before it; it counts to the queue bound like a step.
        """
        accepted = time.perf_counter()
        self.require_ready()
        prompt = _prompt(body)
        max_tokens = self._max_tokens(body.max_tokens)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        params = sampling.SamplingParams(max_tokens=max_tokens, temperature=body.temperature, seed=seed)
        job = self.queue.submit(lambda: self.engine.generate(adapter, prompt, params))
        result: Generation = await self._wait(job, disconnected)
        timing = self._timing(job, result, accepted)
        user, system = prompt.teacher_reads()
        return responses.generation(adapter, result, user, system, timing)

    def _max_tokens(self, asked: int | None) -> int:
        if asked is None:
            return min(64, self.max_generate_tokens)
        if asked > self.max_generate_tokens:
            raise InvalidInput(
                f"must be at most {self.max_generate_tokens} (the server's --max-generate-tokens)",
                field="max_tokens",
            )
        return asked

    async def rollouts(
        self,
        adapter: AdapterId | None,
        body: wire.RolloutsRequest,
        disconnected: Callable[[], Awaitable[None]],
    ) -> wire.RolloutsResponse:
        """``n`` fresh answers per prompt from the current version, one batch on the worker."""
        accepted = time.perf_counter()
        self.require_ready()
        if len(body.prompts) * body.n > wire.MAX_ROLLOUT_ROWS:
            raise InvalidInput(
                f"prompts x n is {len(body.prompts) * body.n}; at most {wire.MAX_ROLLOUT_ROWS} a request",
                field="n",
            )
        prompts = [_prompt(p, f"prompts[{i}]") for i, p in enumerate(body.prompts) for _ in range(body.n)]
        max_tokens = self._max_tokens(body.max_tokens)
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        params = [
            sampling.SamplingParams(max_tokens=max_tokens, temperature=body.temperature, seed=seed + i)
            for i in range(len(prompts))
        ]
        job = self.queue.submit(lambda: self.engine.rollouts(adapter, prompts, params))
        done: list[Generation] = await self._wait(job, disconnected)
        rows = []
        for i, (prompt, gen) in enumerate(zip(prompts, done, strict=True)):
            user, system = prompt.teacher_reads()
            draft = responses.sample_draft(gen, user, system)
            sample = (
                draft if body.feedback is None else wire.ReadySample(**dict(draft), feedback=body.feedback)
            )
            rows.append(
                wire.Rollout(
                    prompt_index=i // body.n,
                    text=gen.text,
                    token_ids=gen.token_ids,
                    logprobs=gen.logprobs,
                    finish_reason=gen.finish_reason,
                    seed=gen.seed,
                    sample=sample,
                )
            )
        first = done[0]
        return wire.RolloutsResponse(
            adapter=str(adapter) if adapter is not None else None,
            version=first.version,
            cache=responses.cache_label(first.cache_hit),
            rollouts=rows,
            timing_ms=self._timing(job, first, accepted),
        )

    async def score(
        self,
        adapter: AdapterId | None,
        body: wire.ScoreRequest,
        disconnected: Callable[[], Awaitable[None]],
    ) -> wire.ScoreResponse:
        self.require_ready()
        prompt = _prompt(body)
        if (body.response is None) == (body.response_token_ids is None):
            raise InvalidInput("give either response or response_token_ids, not both", field="response")
        response: Sequence[int] | str = (
            body.response if body.response is not None else body.response_token_ids or []
        )
        job = self.queue.submit(lambda: self.engine.score(adapter, prompt, response))
        done: Scored = await self._wait(job, disconnected)
        return wire.ScoreResponse(
            adapter=str(adapter) if adapter is not None else None,
            version=done.version,
            prompt_token_ids=done.prompt_token_ids,
            token_ids=done.token_ids,
            logprobs=done.logprobs,
            mean_logprob=sum(done.logprobs) / len(done.logprobs),
        )

    async def teacher(
        self,
        adapter: AdapterId | None,
        body: wire.TeacherRequest,
        disconnected: Callable[[], Awaitable[None]],
    ) -> wire.TeacherResponse:
        """The teacher's greedy answer to the conversation with the feedback, beside the student's."""
        self.require_ready()
        training = body.training
        self.default_training.merged(training)  # a bad value is refused before the queue
        prompt = sampling.Prompt(messages=tuple(sampling.Message(m.role, m.content) for m in body.messages))
        max_tokens = self._max_tokens(body.max_tokens)
        job = self.queue.submit(
            lambda: self.engine.teacher_preview(
                adapter, prompt, body.feedback, training, max_tokens, body.top
            )
        )
        done: TeacherPreview = await self._wait(job, disconnected)
        return responses.teacher_preview(adapter, done)

    def _timing(self, job: Job[Any], gen: Generation, accepted: float) -> wire.GenerateTiming:
        return wire.GenerateTiming(
            queue=job.queue_seconds * 1000.0,
            restore=gen.timing_ms.get("restore", 0.0),
            compute=gen.timing_ms.get("compute", 0.0),
            total=(time.perf_counter() - accepted) * 1000.0,
        )

    async def _wait(self, job: Job[T], disconnected: Callable[[], Awaitable[None]]) -> T:
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(disconnected())
        try:
            waiters: list[asyncio.Future[Any]] = [result, gone]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not result.done() and job.future.cancel():
                raise ClientGone("the client disconnected before its step started")
            # Already running: let it finish so its outcome is recorded and the state is whole.
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            job.future.cancel()  # succeeds only while the job waits
            raise
        finally:
            gone.cancel()


def _prompt(body: wire.PromptIn, field: str = "") -> sampling.Prompt:
    """A request's prompt: chat messages or token ids, exactly one of them."""
    where = f"{field}." if field else ""
    if (body.messages is None) == (body.prompt_token_ids is None):
        raise InvalidInput("give either messages or prompt_token_ids, not both", field=f"{where}messages")
    messages = tuple(sampling.Message(m.role, m.content) for m in body.messages or ())
    return sampling.Prompt(messages=messages, token_ids=tuple(body.prompt_token_ids or ()))
