"""The persistent trainer engine: one base model, many adapters, one SDPO step at a time.

The base model is loaded once and wrapped with PEFT once (see ``slots``). A step restores the
adapter's weights and AdamW state into its shape's slot (from the CPU cache on a hit, from storage
on a miss), computes the SDPO loss and updates, writes the new version through to storage, and only
then hands the snapshot to the cache, so a failure at any point leaves both at the old version.
A hit and a miss restore through the same code: the cache and storage both give a
:class:`~lorafleet_trainer.engine.bundles.StateBundle`, and the slot copies it in one copy.

Locks, in the only order they are ever taken (each later one is held only briefly, and never
while waiting for an earlier one): ``_load_lock`` (the one model load) -> ``_lock`` (steps and
every change of adapter state; in the service the step queue already runs writes one at a time,
so it is uncontended there and guards direct callers such as tests and the benchmark) ->
``_info_lock`` (the metadata map and the counters) -> the cache's and the store's own locks.
Reads (state, cache, stats) never take ``_lock``, so they do not wait for a running step.

A failed step leaves nothing behind: its exception is returned to the caller with the locals of
every finished frame cleared, so neither the error nor the future holding it keeps an autograd
graph, a batch or a device buffer alive.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorafleet_api.wire import KEYED_STEPS_KEPT
from lorafleet_trainer.engine import decoding, fusing, holds, previewing, stepping
from lorafleet_trainer.engine.cache import AdapterCache, CacheInfo
from lorafleet_trainer.engine.durability import DEFAULT_BACKLOG, BackgroundWriter
from lorafleet_trainer.engine.durability import MODES as DURABILITY_MODES
from lorafleet_trainer.engine.previewing import Answering
from lorafleet_trainer.engine.residency import MODES, Residency
from lorafleet_trainer.engine.slots import LoraSlot, SlotManager, adapter_config_dict, linear_module_names
from lorafleet_trainer.engine.storage import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_KEEP_VERSIONS,
    AdapterMeta,
    AdapterStore,
)
from lorafleet_trainer.errors import ConfigConflict, InvalidInput, NotReady, StorageFull
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning import prompting, sampling
from lorafleet_trainer.learning.configs import LoraSpec, Overrides, TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample
from lorafleet_trainer.models import models
from lorafleet_trainer.results import (
    AdapterRecord,
    EngineStats,
    Generation,
    InitResult,
    KeyedStep,
    Scored,
    StepKey,
    StepRequest,
    StepResult,
    TeacherPreview,
)
from lorafleet_trainer.settings import DEFAULT_STEP_TOKEN_BUDGET

DEVICES = ("auto", "cpu", "cuda")
log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    storage_root: Path
    base_model: str = "builtin:tiny"
    cache_capacity_bytes: int = 0  # 0 disables the cache: every step reads and writes storage
    device: str = "auto"
    gpu_residency: str = "offload"
    dtype: str = "auto"  # the base weights'; "auto" is bfloat16 on CUDA, float32 on the CPU
    model_cache_dir: Path | None = None
    default_training: TrainingSpec = field(default_factory=TrainingSpec)
    step_holds: holds.PhaseHolds | None = None  # test-only: park steps at named phases
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # committed versions kept loadable by path
    # Padded tokens (rows x longest row) of one forward of a step; more samples run as micro-batches.
    step_token_budget: int = DEFAULT_STEP_TOKEN_BUDGET
    # base_model_name_or_path in adapter_config.json: the name inference servers serve the base under.
    served_base_model_name: str | None = None
    # sync: a step answers once its version is durable; async: after the in-memory commit, a
    # background writer persisting the newest version of each adapter (engine/durability.py).
    durability: str = "sync"
    write_backlog: int = DEFAULT_BACKLOG  # async: versions the writer may hold before steps wait
    # The bound on one fused step (``distill_many``): adapters, sample rows, and tokens (the longer
    # of student and teacher row per sample); each forward is still bounded by step_token_budget.
    fuse_max_adapters: int = fusing.DEFAULT_FUSE_MAX_ADAPTERS
    fuse_max_rows: int = fusing.DEFAULT_FUSE_MAX_ROWS
    fuse_max_tokens: int = fusing.DEFAULT_FUSE_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY_MODES:
            raise InvalidInput(f"must be one of {DURABILITY_MODES}", field="durability")
        if isinstance(self.write_backlog, bool) or self.write_backlog < 1:
            raise InvalidInput("must be a version count >= 1", field="write_backlog")
        if self.device not in DEVICES:
            raise InvalidInput(f"must be one of {DEVICES}", field="device")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidInput(f"must be one of {('auto', *DTYPES)}", field="dtype")
        if self.gpu_residency not in MODES:
            raise InvalidInput(f"must be one of {MODES}", field="gpu_residency")
        if isinstance(self.cache_capacity_bytes, bool) or self.cache_capacity_bytes < 0:
            raise InvalidInput("must be a byte count >= 0", field="cache_capacity_bytes")
        if isinstance(self.step_token_budget, bool) or self.step_token_budget < 1:
            raise InvalidInput("must be a token count >= 1", field="step_token_budget")
        for name in ("fuse_max_adapters", "fuse_max_rows", "fuse_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput("must be an integer >= 1", field=name)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("CUDA was requested but no CUDA device is available", field="device")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type != "cuda":
        # CPU kernels for half precision are few and slow; bfloat16 is the CPU's reduced precision.
        raise InvalidInput("float16 needs a CUDA device; use bfloat16 or float32 on the CPU", field="dtype")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        log.warning(
            "dtype bfloat16 on a CPU without native bf16 matrix multiplication (%s): torch falls back "
            "to a generic kernel and a step takes several times as long as in float32 (7x for "
            "builtin:smollm2 on an AVX2 CPU); float32 is the faster choice here",
            torch.backends.cpu.get_cpu_capability(),
        )
    return DTYPES[name]


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN: AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _strip_frames(exc: BaseException) -> None:
    """Drop the locals of every finished frame in ``exc``'s tracebacks (chained ones too).

    The traceback still prints in full; what goes is what its frames referenced: a failed step's
    autograd graph, activations and device buffers.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


class TrainerEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self._device)
        self.store = AdapterStore(config.storage_root, config.keep_versions)
        self.cache = AdapterCache(config.cache_capacity_bytes)
        self._residency = Residency(self._device, config.gpu_residency)
        self._load_lock = threading.Lock()
        self._lock = threading.RLock()  # steps and every change of adapter state (see the module doc)
        self._info_lock = threading.Lock()  # the metadata map and the counters
        self._meta: dict[AdapterId, AdapterMeta] = {}
        self._gpu_after_step = 0
        self._counts = {"hits": 0, "misses": 0, "tokens": 0, "ok": 0, "failed": 0}
        self._model: Any = None
        self._tokenizer: Any = None
        self._slots: SlotManager | None = None
        self._lanes: dict[str, fusing.Lanes] = {}  # by slot name: the lanes of fused steps
        self.load_count = 0
        self._durable_watchers: list[Callable[[AdapterId, int, str], None]] = []
        self._writer: BackgroundWriter | None = None
        if config.durability == "async":
            step_holds = config.step_holds
            self._writer = BackgroundWriter(
                self.store,
                config.write_backlog,
                on_durable=self._became_durable,
                hold=(lambda: step_holds.at(holds.WRITE)) if step_holds is not None else None,
            )

    # ---- durability ------------------------------------------------------------------------
    @property
    def durability(self) -> str:
        return self.config.durability

    def watch_durable(self, fn: Callable[[AdapterId, int, str], None]) -> None:
        """Call ``fn(adapter, version, artifact)`` when the background writer made a version
        durable (async mode only: in sync mode a step's answer is that moment)."""
        self._durable_watchers.append(fn)

    def _became_durable(self, adapter: AdapterId, version: int) -> None:
        artifact = self.store.artifact(adapter, version)
        for fn in self._durable_watchers:
            fn(adapter, version, artifact)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every committed version is durable (async mode); True when all are."""
        return True if self._writer is None else self._writer.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush the background writer and stop it (graceful shutdown); True when all is durable."""
        return True if self._writer is None else self._writer.close(timeout)

    def _settle(self, adapter: AdapterId) -> None:
        """Wait for ``adapter``'s versions to be durable (retrying a refused write once)."""
        if self._writer is not None:
            self._writer.settle(adapter)

    def _durable_of(self, adapter: AdapterId) -> tuple[AdapterMeta, int | None]:
        """The adapter's metadata and its durable version (None: the same), read as one moment."""
        if self._writer is None:
            return self._meta_for(adapter), None
        with self._writer.locked():
            return self._meta_for(adapter), self._writer.durable_locked(adapter)

    # ---- the base model ------------------------------------------------------------------
    def load(self) -> None:
        """Load the base model (once; concurrent callers wait for the one load)."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            model, tokenizer = models.load(self.config.base_model, self.config.model_cache_dir, self.dtype)
            self._linear_names = linear_module_names(model)
            self._vocab_size = int(model.get_input_embeddings().num_embeddings)
            self._max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
            self._residency.attach(model)
            self._slots = SlotManager(
                model, self.config.base_model, self._residency.slot_home, pin=self._device.type == "cuda"
            )
            self._tokenizer = tokenizer
            self.load_count += 1
            self._model = model  # last: publishing the model is what makes the engine ready

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def vocab_size(self) -> int:
        self._require_ready()
        return self._vocab_size

    @property
    def device(self) -> torch.device:
        return self._device

    def _require_ready(self) -> SlotManager:
        if self._slots is None or self._model is None:
            raise NotReady("the base model is not loaded yet")
        return self._slots

    def _slot(self, lora: LoraSpec) -> LoraSlot:
        return self._require_ready().slot_for(lora)

    # ---- metadata --------------------------------------------------------------------------
    def _meta_for(self, adapter: AdapterId) -> AdapterMeta:
        with self._info_lock:
            meta = self._meta.get(adapter)
            if meta is None:
                meta = self.store.read_meta(adapter)
                self._meta[adapter] = meta
            return meta

    def _set_meta(self, meta: AdapterMeta) -> None:
        with self._info_lock:
            self._meta[meta.adapter] = meta

    def _state(self, meta: AdapterMeta, durable: int | None = None) -> AdapterRecord:
        entry = self.cache.peek(meta.adapter)
        cached = entry is not None and entry.has(meta.adapter, meta.version, meta.epoch)
        error = self._writer.error(meta.adapter) if self._writer is not None else None
        return AdapterRecord(
            adapter=meta.adapter,
            version=meta.version,
            epoch=meta.epoch,
            lora=meta.lora,
            training=meta.training,
            cached=cached,
            cache_bytes=entry.nbytes if entry is not None and cached else 0,
            pinned=self.cache.is_pinned(meta.adapter),
            artifact=self.store.artifact(meta.adapter, meta.version if durable is None else durable),
            durable_version=durable,
            durable_error=error,
        )

    # ---- adapters --------------------------------------------------------------------------
    def _check_lora(self, lora: LoraSpec) -> None:
        for i, module in enumerate(lora.target_modules):
            if module not in self._linear_names:
                raise InvalidInput(
                    f"{module!r} is not a linear layer of {self.config.base_model}; "
                    f"choose from {sorted(self._linear_names)}",
                    field=f"lora.target_modules[{i}]",
                )

    def init_adapter(
        self, adapter: AdapterId, lora: LoraSpec, epoch: int, training: TrainingSpec | None = None
    ) -> InitResult:
        """Create the adapter if absent; record a newer epoch (dropping older cached state)."""
        self._require_ready()
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidInput("must be an integer >= 0", field="epoch")
        self._check_lora(lora)
        with self._lock:
            # What the store holds must be the adapter's newest version before init reads it.
            self._settle(adapter)
            if not self.store.exists(adapter):
                slot = self._slot(lora)
                meta = AdapterMeta(
                    adapter, 0, epoch, lora, training or self.config.default_training, self.config.base_model
                )
                served_as = self.config.served_base_model_name or self.config.base_model
                self.store.write(meta, slot.initial_state(adapter), adapter_config_dict(lora, served_as))
                self._set_meta(meta)
                self.cache.evict(adapter, "invalidated")  # a same-named adapter deleted elsewhere
                return InitResult(True, self._state(meta))
            # Re-read rather than trust memory: while this pod did not own the adapter, another
            # pod (an earlier epoch's placement) may have trained it further.
            meta = self.store.read_meta(adapter)
            self._set_meta(meta)
            if meta.lora.shape_key() != lora.shape_key():
                raise ConfigConflict(
                    f"adapter {adapter} exists with LoRA config {meta.lora.to_dict()}", field="lora"
                )
            if epoch < meta.epoch:
                raise ConfigConflict(
                    f"epoch {epoch} is older than the adapter's epoch {meta.epoch}", field="epoch"
                )
            new = replace(meta, epoch=epoch, training=training if training is not None else meta.training)
            if new != meta:
                self.store.write(new, None)  # metadata only: tensor files are hard-linked
                self._set_meta(new)
                self.cache.invalidate_before(adapter, epoch)
            return InitResult(False, self._state(new))

    def get_adapter(self, adapter: AdapterId) -> AdapterRecord:
        return self._state(*self._durable_of(adapter))

    def evict(self, adapter: AdapterId) -> bool:
        with self._lock:
            # Evicted state is read from the store next: its pending version is written first.
            try:
                self._settle(adapter)
            except StorageFull as exc:
                log.warning("evicting %s with versions not durable (the writer keeps them): %s", adapter, exc)
            return self.cache.evict(adapter, "explicit")

    def delete(self, adapter: AdapterId) -> bool:
        with self._lock:
            if self._writer is not None:
                self._writer.cancel(adapter)  # its pending version is dropped, a running write ends
            cached = self.cache.forget(adapter)
            stored = self.store.delete(adapter)
            with self._info_lock:
                self._meta.pop(adapter, None)
            return stored or cached

    def pin(self, adapter: AdapterId, pinned: bool = True) -> None:
        self._meta_for(adapter)  # AdapterNotFound for an unknown adapter
        self.cache.pin(adapter, pinned)

    def export_zip(self, adapter: AdapterId, version: int | None = None) -> bytes:
        """The PEFT files of ``version`` (the latest by default) as a zip."""
        files = self.store.read_files(adapter, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), version)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return buf.getvalue()

    def cache_info(self) -> CacheInfo:
        return self.cache.info()

    @property
    def store_root(self) -> Path:
        return self.store.root

    def pin_versions(self, pinned: Callable[[AdapterId], Collection[int]]) -> None:
        """Storage keeps the versions ``pinned`` names beyond ``keep_versions`` while it names them."""
        self.store.pinned = pinned

    # ---- training --------------------------------------------------------------------------
    def _restore(self, adapter: AdapterId, meta: AdapterMeta, slot: LoraSlot) -> bool:
        """Put ``adapter``'s current state into ``slot``; True on a cache hit.

        A hit and a miss take the same path: a state bundle (the cache entry, or one read from
        storage) handed to the slot, which copies it in unless it already holds that version.
        Only a cache entry is trusted to match the slot's copy; a miss always copies, and then
        becomes the cache entry.
        """
        entry = self.cache.get(adapter)
        if entry is not None and entry.has(adapter, meta.version, meta.epoch):
            slot.restore(entry)
            return True
        if entry is not None:
            self.cache.evict(adapter, "invalidated")
        held = self._writer.bundle(adapter, meta.version) if self._writer is not None else None
        if held is not None:
            # Not durable yet (async): the writer's copy is the newest state; it is never written into.
            slot.restore(held, reuse=False)
            if self.cache.enabled:
                self.cache.put(held)
            return False
        source = self.store.read_tensors(adapter)
        source.label(adapter, meta.version, meta.epoch)
        slot.restore(source, reuse=False)
        if self.cache.enabled:
            # What was read is what the cache would hold: a later call (a generate, the next step)
            # hits instead of reading storage again, and a step's snapshot reuses its buffer.
            self.cache.put(source)
        return False

    def distill(
        self,
        adapter: AdapterId,
        samples: Sequence[DistillSample],
        training: Overrides = None,
        key: StepKey | None = None,
    ) -> StepResult:
        """One SDPO step; returns once the new version is durable (``sync``) or committed in memory
        and handed to the background writer (``async``). Failures change nothing.

        With ``key``: a step already committed under that key (one of the adapter's last
        ``KEYED_STEPS_KEPT``) is answered again instead of applied twice; the same key with another
        request's digest is refused.
        """
        slots = self._require_ready()
        try:
            with self._lock:
                kept = self._keyed(adapter, key)
                if kept is not None:
                    return replace(kept.replay(), durable_version=self._durable_of(adapter)[1])
                if self._writer is not None and self._writer.error(adapter) is not None:
                    self._settle(adapter)  # a refused write is retried first: 507 if refused again
                result = self._distill(slots, adapter, samples, training, key)
        except BaseException as exc:
            self._count("failed", 1)
            _strip_frames(exc)
            raise
        finally:
            self._measure_gpu()
        self._counted(result)
        return result

    def _counted(self, result: StepResult) -> None:
        self._count("ok", 1)
        self._count("tokens", int(result.metrics["tokens_processed"]))
        self._count("hits" if result.cache_hit else "misses", 1)

    def _failed(self, exc: Exception) -> Exception:
        self._count("failed", 1)
        _strip_frames(exc)
        return exc

    def distill_many(self, requests: Sequence[StepRequest]) -> list[StepResult | Exception]:
        """Several steps, each answered on its own (its result or its error, in request order).

        Steps of different adapters with the same LoRA shape run fused (``fusing``): one forward
        and backward for all, then each adapter's own check, clipping, AdamW and commit, the same
        commit a single step makes; within the configured bounds, and as a single step when alone.
        Two steps of one adapter never run together: they go to successive waves, in order. One
        adapter's bad samples, non-finite loss or failed write fail that adapter's step only.
        """
        slots = self._require_ready()
        results: list[StepResult | Exception | None] = [None] * len(requests)
        try:
            with self._lock:
                for wave in fusing.waves([r.adapter for r in requests]):
                    self._run_wave(slots, [(i, requests[i]) for i in wave], results)
        finally:
            self._measure_gpu()
        out: list[StepResult | Exception] = []
        for r in results:
            assert r is not None  # every request of every wave has its answer
            out.append(r)
        return out

    def _run_wave(
        self,
        slots: SlotManager,
        wave: Sequence[tuple[int, StepRequest]],
        results: list[StepResult | Exception | None],
    ) -> None:
        """One wave (distinct adapters): replays answered, the rest prepared, grouped by LoRA shape
        and run fused within the bounds."""
        ready: dict[tuple[Any, ...], list[fusing.Ready]] = {}
        for i, request in wave:
            try:
                kept = self._keyed(request.adapter, request.key)
                if kept is not None:
                    # A replay is answered, not counted as a step (as ``distill`` answers it).
                    results[i] = replace(kept.replay(), durable_version=self._durable_of(request.adapter)[1])
                    continue
                if self._writer is not None and self._writer.error(request.adapter) is not None:
                    self._settle(request.adapter)
                meta = self._meta_for(request.adapter)
                spec = meta.training.merged(request.training)
                prepared = stepping.prepare(
                    request.samples, self._tokenizer, self._vocab_size, self._max_positions, spec
                )
            except Exception as exc:
                results[i] = self._failed(exc)
                continue
            ready.setdefault(meta.lora.shape_key(), []).append(fusing.Ready(i, request, meta, spec, prepared))
        cfg = self.config
        for group in ready.values():
            for chunk in fusing.chunks(
                group,
                lambda r: len(r.prepared),
                lambda r: fusing.sample_tokens(r.prepared),
                cfg.fuse_max_adapters,
                cfg.fuse_max_rows,
                cfg.fuse_max_tokens,
            ):
                outcomes = self._fused(slots, chunk) if len(chunk) > 1 else [self._single(slots, chunk[0])]
                for r, outcome in zip(chunk, outcomes, strict=True):
                    if isinstance(outcome, StepResult):
                        self._counted(outcome)
                        results[r.index] = outcome
                    else:
                        results[r.index] = self._failed(outcome)

    def _single(self, slots: SlotManager, r: fusing.Ready) -> StepResult | Exception:
        try:
            batch = stepping.Batch.pack(
                r.prepared, pin=self._device.type == "cuda", token_budget=self.config.step_token_budget
            )
            return self._step(slots, r.request.adapter, r.meta, r.spec, batch, r.request.key)
        except Exception as exc:
            return exc

    def _fused(self, slots: SlotManager, chunk: Sequence[fusing.Ready]) -> list[StepResult | Exception]:
        """One fused step of ``chunk`` (distinct adapters of one LoRA shape), each its own outcome."""
        slot = self._slot(chunk[0].meta.lora)
        slots.activate(slot)
        lanes = self._lanes.get(slot.name)
        if lanes is None:
            pin = self._device.type == "cuda"
            lanes = self._lanes[slot.name] = fusing.Lanes(
                slots.peft_model, slot, self._residency.slot_home, pin
            )
        taken = lanes.take([r.request.adapter for r in chunk])
        out: list[StepResult | Exception | None] = [None] * len(chunk)
        with self._residency.on_device(*taken):
            holds.at(self.config.step_holds, "restore")
            live: list[tuple[int, bool, float, int]] = []  # (index, hit, restore seconds, bytes read)
            for j, (r, lane) in enumerate(zip(chunk, taken, strict=True)):
                read_before, t0 = self.store.read_bytes, time.perf_counter()
                try:
                    hit = self._restore(r.request.adapter, r.meta, lane)
                except Exception as exc:
                    out[j] = exc
                    continue
                live.append((j, hit, time.perf_counter() - t0, self.store.read_bytes - read_before))
            for j, *_ in live:
                taken[j].begin_update()
            holds.at(self.config.step_holds, "compute")
            t1 = time.perf_counter()
            outcomes: Sequence[fusing.Outcome | Exception]
            try:
                fused = fusing.FusedBatch.pack(
                    [chunk[j].prepared for j, *_ in live],
                    pin=self._device.type == "cuda",
                    token_budget=self.config.step_token_budget,
                )
                outcomes = fusing.train_step(
                    slots.peft_model,
                    lanes,
                    [taken[j] for j, *_ in live],
                    [chunk[j].spec for j, *_ in live],
                    fused,
                    self._device,
                    self.dtype,
                )
            except Exception as exc:
                outcomes = [exc] * len(live)
            compute = time.perf_counter() - t1
            for (j, hit, restore, read), outcome in zip(live, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    out[j] = outcome
                    continue
                r = chunk[j]
                t2 = time.perf_counter()
                try:
                    new, artifact, durable, t3 = self._commit(
                        r.request.adapter, r.meta, taken[j], r.request.key, hit, outcome
                    )
                except Exception as exc:
                    out[j] = exc
                    continue
                timing = {
                    "restore": restore,
                    "compute": compute,
                    "snapshot": t3 - t2,
                    "persist": time.perf_counter() - t3,
                }
                out[j] = StepResult(
                    version=new.version,
                    cache_hit=hit,
                    metrics=outcome,
                    timing_ms={k: v * 1000.0 for k, v in timing.items()},
                    storage_read_bytes=read,
                    artifact=artifact,
                    durable_version=durable,
                    fused_adapters=len(live),
                )
        holds.at(self.config.step_holds, "answer")
        done: list[StepResult | Exception] = []
        for o in out:
            assert o is not None
            done.append(o)
        return done

    def _keyed(self, adapter: AdapterId, key: StepKey | None) -> KeyedStep | None:
        """The committed step ``key`` names, if any (under the step lock: steps commit in order)."""
        if key is None:
            return None
        kept = self._meta_for(adapter).keyed_step(key.key)
        if kept is not None and kept.key.digest != key.digest:
            raise ConfigConflict(
                f"idempotency key {key.key!r} was already used for another request (version "
                f"{kept.version}); a retry must repeat the same body",
                field="idempotency_key",
            )
        return kept

    def _distill(
        self,
        slots: SlotManager,
        adapter: AdapterId,
        samples: Sequence[DistillSample],
        training: Overrides,
        key: StepKey | None,
    ) -> StepResult:
        # Under the step lock: a fast tokenizer must not be borrowed by two threads at once.
        meta = self._meta_for(adapter)
        spec = meta.training.merged(training)
        prepared = stepping.prepare(samples, self._tokenizer, self._vocab_size, self._max_positions, spec)
        batch = stepping.Batch.pack(
            prepared, pin=self._device.type == "cuda", token_budget=self.config.step_token_budget
        )
        return self._step(slots, adapter, meta, spec, batch, key)

    def _step(
        self,
        slots: SlotManager,
        adapter: AdapterId,
        meta: AdapterMeta,
        spec: TrainingSpec,
        batch: stepping.Batch,
        key: StepKey | None = None,
    ) -> StepResult:
        slot = self._slot(meta.lora)
        slots.activate(slot)
        read_before = self.store.read_bytes
        gpu = self._device.type == "cuda"
        # CUDA events time the restore copy without a wait of its own; the step's one metrics read
        # has completed them by the time they are read.
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if gpu else []
        with self._residency.on_device(slot):
            holds.at(self.config.step_holds, "restore")
            t0 = time.perf_counter()
            for ev in events[:1]:
                ev.record()
            hit = self._restore(adapter, meta, slot)
            for ev in events[1:]:
                ev.record()
            t1 = time.perf_counter()
            slot.begin_update()
            holds.at(self.config.step_holds, "compute")
            metrics = stepping.train_step(slots.peft_model, slot, spec, batch, self._device, self.dtype)
            t2 = time.perf_counter()
            new, artifact, durable, t3 = self._commit(adapter, meta, slot, key, hit, metrics)
            t4 = time.perf_counter()
        holds.at(self.config.step_holds, "answer")
        restore_s = events[0].elapsed_time(events[1]) / 1000.0 if events else t1 - t0
        timing = {
            "restore": restore_s,
            "compute": t2 - t0 - restore_s,
            "snapshot": t3 - t2,
            "persist": t4 - t3,
        }
        return StepResult(
            version=new.version,
            cache_hit=hit,
            metrics=metrics,
            timing_ms={k: v * 1000.0 for k, v in timing.items()},
            storage_read_bytes=self.store.read_bytes - read_before,
            artifact=artifact,
            durable_version=durable,
        )

    def _commit(
        self,
        adapter: AdapterId,
        meta: AdapterMeta,
        slot: LoraSlot,
        key: StepKey | None,
        hit: bool,
        metrics: dict[str, float],
    ) -> tuple[AdapterMeta, str, int | None, float]:
        """Commit the update ``slot`` holds as ``adapter``'s next version: the snapshot (refused if a
        weight went non-finite), the write (sync) or hand-off to the writer (async), the metadata,
        then the cache. One path for a single step and for each adapter of a fused step.

        Returns the new metadata, its artifact, the durable version (async) and when the snapshot
        was taken (``perf_counter``), which splits the snapshot time from the persist time.
        """
        new = replace(meta, version=meta.version + 1)
        directory = self.store.new_directory(adapter, new.version)
        artifact = self.store.artifact(adapter, new.version, directory)
        if key is not None:  # committed with the version it answers, in the same write
            done = KeyedStep(key, new.version, artifact, hit, metrics)
            new = replace(new, keyed=meta.with_keyed(done, KEYED_STEPS_KEPT))
        snapshot = slot.snapshot(adapter, new.version, new.epoch)  # the one copy back, and its wait
        snapped = time.perf_counter()
        holds.at(self.config.step_holds, "persist")
        durable: int | None = None
        if self._writer is None:
            # The adapter_config.json is linked, it never changes.
            self.store.write(new, snapshot, directory=directory)
            self._set_meta(new)
        else:
            # The hand-off: it waits while the writer's backlog is full (back-pressure).
            before = self._durable_of(adapter)[1]
            self._writer.submit(
                new, snapshot, durable=meta.version if before is None else before, directory=directory
            )
            self._set_meta(new)
            durable = self._durable_of(adapter)[1]
        holds.at(self.config.step_holds, "snapshot")
        _, spare = self.cache.put(snapshot) if self.cache.enabled else (False, snapshot)
        if spare is not None and self._writer is not None and self._writer.holds(spare):
            spare = None  # the writer still reads it: the next snapshot takes a new buffer
        slot.commit(snapshot, spare)
        return new, artifact, durable, snapped

    # ---- sampling, scoring, the teacher's preview -----------------------------------------------
    @contextmanager
    def _answering(self, adapter: AdapterId | None) -> Iterator[Answering]:
        """The model answering as ``adapter``'s current version (the bare base model when None).

        Held under the step lock (a fast tokenizer must not be borrowed by two threads at once); the
        adapter's state comes into its slot as for a step (a cache hit, else storage). Changes nothing.
        """
        slots = self._require_ready()
        with self._lock:
            version: int | None = None
            hit: bool | None = None
            slot: LoraSlot | None = None
            if adapter is not None:
                meta = self._meta_for(adapter)
                slot = self._slot(meta.lora)
                slots.activate(slot)
            model: Any = slots.peft_model if slots.peft_model is not None else slots.base
            autocast = torch.autocast(
                self._device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
            )
            t0 = time.perf_counter()
            with self._residency.on_device(slot):
                if adapter is not None and slot is not None:
                    hit = self._restore(adapter, meta, slot)
                    version = meta.version
                # The bare base model: PEFT's layers, once injected, must be switched off.
                bare = adapter is None and model is not slots.base
                with autocast, model.disable_adapter() if bare else nullcontext(), torch.no_grad():
                    yield Answering(
                        model,
                        version,
                        hit,
                        (time.perf_counter() - t0) * 1000.0,
                        slot,
                    )

    def _prompt_ids(self, prompt: sampling.Prompt, field: str = "messages") -> list[int]:
        ids = list(prompt.token_ids) or sampling.chat_prompt_ids(self._tokenizer, prompt.messages)
        sampling.check_prompt(
            ids, self._vocab_size, self._max_positions, "prompt_token_ids" if prompt.token_ids else field
        )
        return ids

    def _decode(
        self, model: Any, prompts: list[list[int]], params: Sequence[sampling.SamplingParams]
    ) -> list[Any]:
        stop = sampling.stop_ids(self._tokenizer, self._model)
        pad = (
            self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else min(stop, default=0)
        )
        return decoding.sample_batch(model, prompts, params, stop, self._device, self._max_positions, pad)

    def generate(
        self, adapter: AdapterId | None, prompt: sampling.Prompt, params: sampling.SamplingParams
    ) -> Generation:
        """Sample from ``adapter``'s current version (the bare base model when None); changes nothing."""
        (out,) = self.rollouts(adapter, [prompt], [params])
        return out

    def rollouts(
        self,
        adapter: AdapterId | None,
        prompts: Sequence[sampling.Prompt],
        params: Sequence[sampling.SamplingParams],
    ) -> list[Generation]:
        """One answer per prompt (with its own sampling parameters), decoded as one padded batch."""
        self._require_ready()
        with self._answering(adapter) as ans:
            ids = [self._prompt_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
            t1 = time.perf_counter()
            outs = self._decode(ans.model, ids, params)
            compute = (time.perf_counter() - t1) * 1000.0
        return [
            Generation(
                version=ans.version,
                cache_hit=ans.cache_hit,
                prompt_token_ids=prompt_ids,
                token_ids=out.token_ids,
                logprobs=out.logprobs,
                text=self._tokenizer.decode(out.token_ids, skip_special_tokens=True),
                prompt_text=self._tokenizer.decode(prompt_ids),
                finish_reason=out.finish_reason,
                seed=p.seed,
                timing_ms={"restore": ans.restore_ms, "compute": compute},
            )
            for prompt_ids, out, p in zip(ids, outs, params, strict=True)
        ]

    def score(
        self, adapter: AdapterId | None, prompt: sampling.Prompt, response: Sequence[int] | str
    ) -> Scored:
        """The log-probability of each response token after ``prompt``, under ``adapter``'s version.

        A text response is tokenized as the answer's own tokens (no special tokens added)."""
        self._require_ready()
        with self._answering(adapter) as ans:
            ids = self._prompt_ids(prompt)
            if isinstance(response, str):
                response_ids = [int(t) for t in self._tokenizer.encode(response, add_special_tokens=False)]
                if not response_ids:
                    raise InvalidInput("has no token", field="response")
            else:
                response_ids = list(response)
            # Each response token against the vocabulary, named by its own index; then the whole
            # sequence against the context (the last token is predicted, never fed).
            sampling.check_prompt(response_ids, self._vocab_size, self._max_positions, "response_token_ids")
            if len(ids) + len(response_ids) > self._max_positions:
                raise InvalidInput(
                    f"prompt and response take {len(ids) + len(response_ids)} tokens;"
                    f" the model's context is {self._max_positions}",
                    field="response",
                )
            logprobs = previewing.token_logprobs(ans.model, ids, list(response_ids), self._device)
        return Scored(ans.version, ids, list(response_ids), logprobs)

    def teacher_preview(
        self,
        adapter: AdapterId | None,
        prompt: sampling.Prompt,
        feedback: str,
        training: Overrides,
        max_tokens: int,
        top: int,
    ) -> TeacherPreview:
        """What the teacher would make of ``feedback`` on ``prompt``, beside the student.

        The student (the adapter's version, or the base) answers greedily; the teacher (the frozen
        base reading the feedback through the adapter's template) answers greedily too; at the first
        positions of the teacher's answer both sides' top tokens are compared.
        """
        self._require_ready()
        spec = (
            self._meta_for(adapter).training if adapter is not None else self.config.default_training
        ).merged(training)
        if not prompt.messages:
            raise InvalidInput("the teacher preview needs chat messages", field="messages")
        user, system = prompt.teacher_reads()
        greedy = sampling.SamplingParams(max_tokens=max_tokens)
        with self._answering(adapter) as ans:
            student_ids = self._prompt_ids(prompt)
            (student,) = self._decode(ans.model, [student_ids], [greedy])
            student_text = self._tokenizer.decode(student.token_ids, skip_special_tokens=True)
            given = prompting.TeacherInput(user or "", feedback, system, student_text)
            messages = prompting.teacher_messages(given, spec.teacher_template, spec.teacher_custom_template)
            teacher_ids = sampling.chat_ids(self._tokenizer, messages)
            sampling.check_prompt(teacher_ids, self._vocab_size, self._max_positions, "feedback")
            # The bare base model answering is the base teacher already.
            teacher_weights: Callable[[], AbstractContextManager[Any]] = (
                (lambda: stepping.teacher_weights(ans.model, ans.slot, spec))
                if ans.slot is not None
                else nullcontext
            )
            with teacher_weights():
                (teacher,) = self._decode(ans.model, [teacher_ids], [greedy])
            positions = previewing.compare(
                ans.model,
                teacher_weights,
                self._tokenizer,
                student_ids,
                teacher_ids,
                teacher.token_ids,
                top,
                self._device,
            )
        return TeacherPreview(
            version=ans.version,
            template=spec.teacher_template,
            teacher_prompt=self._tokenizer.decode(teacher_ids),
            teacher_text=self._tokenizer.decode(teacher.token_ids, skip_special_tokens=True),
            student_text=student_text,
            positions=positions,
        )

    # ---- observability ---------------------------------------------------------------------
    def _count(self, key: str, n: int) -> None:
        with self._info_lock:
            self._counts[key] += n

    def _measure_gpu(self) -> None:
        """GPU memory right after a step: the between-steps level the alert watches (a scrape
        lands mid-step on a busy pod, so the live gauge rarely shows it)."""
        if self._device.type == "cuda":
            self._gpu_after_step = torch.cuda.memory_allocated(self._device)

    def stats(self) -> EngineStats:
        with self._info_lock:
            counts = dict(self._counts)
        info = self.cache.info()
        gpu = self._device.type == "cuda"
        return EngineStats(
            cache_hits=counts["hits"],
            cache_misses=counts["misses"],
            evictions=dict(self.cache.evictions),
            storage_read_bytes=self.store.read_bytes,
            storage_write_bytes=self.store.written_bytes,
            tokens=counts["tokens"],
            steps_ok=counts["ok"],
            steps_failed=counts["failed"],
            cache_entries=len(info.entries),
            cache_bytes=info.used_bytes,
            cache_capacity_bytes=info.capacity_bytes,
            host_pinned_bytes=host_pinned_bytes(self._residency.registered_bytes) if gpu else 0,
            gpu_memory_allocated_bytes=torch.cuda.memory_allocated(self._device) if gpu else 0,
            gpu_memory_reserved_bytes=torch.cuda.memory_reserved(self._device) if gpu else 0,
            gpu_memory_peak_bytes=torch.cuda.max_memory_allocated(self._device) if gpu else 0,
            gpu_memory_after_step_bytes=self._gpu_after_step,
            **self._write_stats(),
        )

    def _write_stats(self) -> dict[str, int]:
        writer = self._writer
        if writer is None:
            return {}
        return {
            "durable_lag_versions": max(writer.lag().values(), default=0),
            "write_backlog_versions": writer.outstanding,
            "writes_coalesced": writer.coalesced,
            "write_failures": writer.failures,
        }


def host_pinned_bytes(registered: int) -> int:
    """Page-locked host memory as the pinned allocator itself counts it (its blocks are rounded up
    to powers of two and freed ones are kept, so the sum of tensor sizes would understate it),
    plus memory registered outside it (the offloaded base). Where torch has no allocator
    statistics, only the registered bytes are known and reported."""
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats is None:
        return registered
    return int(stats().get("allocated_bytes.current", 0)) + registered
