"""The persistent trainer engine: one base model, many adapters, one SDPO step at a time.

The base model is loaded once and wrapped with PEFT once (see ``slots``). A step restores the
adapter's weights and AdamW state into its shape's slot (from the CPU cache on a hit, from storage
on a miss), computes the SDPO loss and updates, writes the new version through to storage, and only
then snapshots the slot into the cache, so a failure at any point leaves both at the old version.
Steps and every state change are serialised by one lock; reads (state, cache, stats) do not wait
for a running step.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorafleet_trainer import decoding, holds, models, sampling, stepping
from lorafleet_trainer.cache import AdapterCache, CacheInfo
from lorafleet_trainer.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.errors import ConfigConflict, InvalidInput, NotReady
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.residency import MODES, Residency
from lorafleet_trainer.results import AdapterState, EngineStats, Generation, InitResult, StepResult
from lorafleet_trainer.samples import DistillSample
from lorafleet_trainer.slots import LoraSlot, SlotManager, adapter_config_dict, linear_module_names
from lorafleet_trainer.storage import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_KEEP_VERSIONS,
    AdapterMeta,
    AdapterStore,
)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    storage_root: Path
    base_model: str = "builtin:tiny"
    cache_capacity_bytes: int = 0  # 0 disables the cache: every step reads and writes storage
    device: str = "auto"
    gpu_residency: str = "offload"
    model_cache_dir: Path | None = None
    default_training: TrainingSpec = field(default_factory=TrainingSpec)
    step_holds: holds.PhaseHolds | None = None  # test-only: park steps at named phases
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # committed versions kept loadable by path
    # base_model_name_or_path in adapter_config.json: the name inference servers serve the base under.
    served_base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise InvalidInput(f"must be one of {DEVICES}", field="device")
        if self.gpu_residency not in MODES:
            raise InvalidInput(f"must be one of {MODES}", field="gpu_residency")
        if isinstance(self.cache_capacity_bytes, bool) or self.cache_capacity_bytes < 0:
            raise InvalidInput("must be a byte count >= 0", field="cache_capacity_bytes")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("CUDA was requested but no CUDA device is available", field="device")
    return torch.device(name)


class TrainerEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._device = _resolve_device(config.device)
        self.store = AdapterStore(config.storage_root, config.keep_versions)
        self.cache = AdapterCache(config.cache_capacity_bytes, pin_memory=self._device.type == "cuda")
        self._residency = Residency(self._device, config.gpu_residency)
        self._load_lock = threading.Lock()
        self._lock = threading.RLock()  # steps and every change of adapter state
        self._meta_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._meta: dict[AdapterId, AdapterMeta] = {}
        self._counter_lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "tokens": 0, "ok": 0, "failed": 0}
        self._model: Any = None
        self._tokenizer: Any = None
        self._slots: SlotManager | None = None
        self.load_count = 0

    # ---- the base model ------------------------------------------------------------------
    def load(self) -> None:
        """Load the base model (once; concurrent callers wait for the one load)."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            model, tokenizer = models.load(self.config.base_model, self.config.model_cache_dir)
            self._linear_names = linear_module_names(model)
            self._vocab_size = int(model.get_input_embeddings().num_embeddings)
            self._max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
            self._residency.attach(model)
            self._slots = SlotManager(model, self.config.base_model)
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
        slots = self._require_ready()
        before = len(slots)
        slot = slots.slot_for(lora)
        if len(slots) != before:
            self._residency.attach(slots.peft_model)  # pin (or move) the new slot's tensors too
        return slot

    # ---- metadata --------------------------------------------------------------------------
    def _meta_for(self, adapter: AdapterId) -> AdapterMeta:
        with self._meta_lock:
            meta = self._meta.get(adapter)
            if meta is None:
                meta = self.store.read_meta(adapter)
                self._meta[adapter] = meta
            return meta

    def _set_meta(self, meta: AdapterMeta) -> None:
        with self._meta_lock:
            self._meta[meta.adapter] = meta

    def _state(self, meta: AdapterMeta) -> AdapterState:
        entry = self.cache.peek(meta.adapter)
        cached = entry is not None and entry.version == meta.version and entry.epoch == meta.epoch
        return AdapterState(
            adapter=meta.adapter,
            version=meta.version,
            epoch=meta.epoch,
            lora=meta.lora,
            training=meta.training,
            cached=cached,
            cache_bytes=entry.nbytes if entry is not None and cached else 0,
            pinned=self.cache.is_pinned(meta.adapter),
            artifact=self.store.artifact(meta.adapter, meta.version),
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
            if not self.store.exists(adapter):
                slot = self._slot(lora)
                meta = AdapterMeta(
                    adapter, 0, epoch, lora, training or self.config.default_training, self.config.base_model
                )
                served_as = self.config.served_base_model_name or self.config.base_model
                self.store.write(meta, slot.initial_tensors(adapter), adapter_config_dict(lora, served_as))
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

    def get_adapter(self, adapter: AdapterId) -> AdapterState:
        return self._state(self._meta_for(adapter))

    def evict(self, adapter: AdapterId) -> bool:
        with self._lock:
            return self.cache.evict(adapter, "explicit")

    def delete(self, adapter: AdapterId) -> bool:
        with self._lock:
            cached = self.cache.forget(adapter)
            stored = self.store.delete(adapter)
            with self._meta_lock:
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

    # ---- training --------------------------------------------------------------------------
    def _restore(self, adapter: AdapterId, meta: AdapterMeta, slot: LoraSlot) -> bool:
        """Put ``adapter``'s current state into ``slot``; True on a cache hit."""
        wanted = (adapter, meta.version, meta.epoch)
        entry = self.cache.get(adapter)
        if entry is not None and entry.version == meta.version and entry.epoch == meta.epoch:
            # The slot may still hold exactly this state from the adapter's previous step (not
            # when offloading: the device copies were dropped after that step).
            if slot.holds != wanted or self._residency.offloading:
                slot.load_flat(entry.tensors)
            slot.holds = wanted
            return True
        if entry is not None:
            self.cache.evict(adapter, "invalidated")
        slot.holds = None
        slot.load_tensors(self.store.read_tensors(adapter))
        slot.holds = wanted
        return False

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def distill(
        self, adapter: AdapterId, samples: Sequence[DistillSample], training: Mapping[str, Any] | None = None
    ) -> StepResult:
        """One SDPO step; returns once the new version is durable. Failures change nothing."""
        slots = self._require_ready()
        with self._tokenizer_lock:  # a fast tokenizer must not be borrowed by two threads at once
            batch = stepping.prepare(samples, self._tokenizer, self._vocab_size, self._max_positions)
        with self._lock:
            meta = self._meta_for(adapter)
            spec = meta.training.merged(training)
            try:
                result = self._step(slots, adapter, meta, spec, batch)
            except BaseException:
                self._count("failed", 1)
                raise
        self._count("ok", 1)
        self._count("tokens", int(result.metrics["tokens_processed"]))
        self._count("hits" if result.cache_hit else "misses", 1)
        return result

    def _step(
        self,
        slots: SlotManager,
        adapter: AdapterId,
        meta: AdapterMeta,
        spec: TrainingSpec,
        batch: list[stepping.Prepared],
    ) -> StepResult:
        slot = self._slot(meta.lora)
        slots.activate(slot)
        read_before = self.store.read_bytes
        with self._residency.on_device(slots.peft_model, slot.optimizer):
            holds.at(self.config.step_holds, "restore")
            t0 = time.perf_counter()
            hit = self._restore(adapter, meta, slot)
            self._sync()
            t1 = time.perf_counter()
            slot.holds = None  # from here until the snapshot the slot is ahead of every copy
            holds.at(self.config.step_holds, "compute")
            metrics = stepping.train_step(slots.peft_model, slot, spec, batch, self._device)
            self._sync()
            holds.at(self.config.step_holds, "persist")
            t2 = time.perf_counter()
            new = replace(meta, version=meta.version + 1)
            self.store.write(new, slot.export())  # the adapter_config.json is linked, it never changes
            self._set_meta(new)
            holds.at(self.config.step_holds, "snapshot")
            t3 = time.perf_counter()
            if self.cache.enabled:
                try:
                    if self.cache.put(adapter, new.version, new.epoch, slot.flat()) is not None:
                        slot.holds = (adapter, new.version, new.epoch)
                except BaseException:
                    # Storage already holds the new version; a half-copied entry must not survive.
                    self.cache.evict(adapter, "invalidated")
                    raise
            t4 = time.perf_counter()
        holds.at(self.config.step_holds, "answer")
        timing = {"restore": t1 - t0, "compute": t2 - t1, "persist": t3 - t2, "snapshot": t4 - t3}
        return StepResult(
            version=new.version,
            cache_hit=hit,
            metrics=metrics,
            timing_ms={k: v * 1000.0 for k, v in timing.items()},
            storage_read_bytes=self.store.read_bytes - read_before,
            artifact=self.store.artifact(adapter, new.version),
        )

    # ---- sampling ----------------------------------------------------------------------------
    def generate(
        self, adapter: AdapterId | None, prompt: sampling.Prompt, params: sampling.SamplingParams
    ) -> Generation:
        """Sample from ``adapter``'s current version (the bare base model when None); changes nothing.

        The adapter's state comes into its slot as for a step (a cache hit, else storage).
        """
        slots = self._require_ready()
        with self._tokenizer_lock:
            ids = list(prompt.token_ids) or sampling.chat_prompt_ids(self._tokenizer, prompt.messages)
            stop = sampling.stop_ids(self._tokenizer, self._model)
        field = "prompt_token_ids" if prompt.token_ids else "messages"
        sampling.check_prompt(ids, self._vocab_size, self._max_positions, field)
        with self._lock:
            version: int | None = None
            hit: bool | None = None
            t0 = time.perf_counter()
            if adapter is not None:
                meta = self._meta_for(adapter)
                slot = self._slot(meta.lora)
                slots.activate(slot)
            model: Any = slots.peft_model if slots.peft_model is not None else slots.base
            with self._residency.on_device(model, None):
                if adapter is not None:
                    hit = self._restore(adapter, meta, slot)
                    version = meta.version
                    self._sync()
                t1 = time.perf_counter()
                # The bare base model: PEFT's layers, once injected, must be switched off.
                bare = adapter is None and model is not slots.base
                with model.disable_adapter() if bare else nullcontext():
                    out = decoding.sample(model, ids, params, stop, self._device, self._max_positions)
                t2 = time.perf_counter()
        with self._tokenizer_lock:
            text = self._tokenizer.decode(out.token_ids, skip_special_tokens=True)
            prompt_text = self._tokenizer.decode(ids)
        return Generation(
            version=version,
            cache_hit=hit,
            prompt_token_ids=ids,
            token_ids=out.token_ids,
            logprobs=out.logprobs,
            text=text,
            prompt_text=prompt_text,
            finish_reason=out.finish_reason,
            seed=params.seed,
            timing_ms={"restore": (t1 - t0) * 1000.0, "compute": (t2 - t1) * 1000.0},
        )

    # ---- observability ---------------------------------------------------------------------
    def _count(self, key: str, n: int) -> None:
        with self._counter_lock:
            self._counts[key] += n

    def stats(self) -> EngineStats:
        with self._counter_lock:
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
            host_pinned_bytes=self.cache.pinned_host_bytes() + self._residency.pinned_bytes,
            gpu_memory_allocated_bytes=torch.cuda.memory_allocated(self._device) if gpu else 0,
            gpu_memory_reserved_bytes=torch.cuda.memory_reserved(self._device) if gpu else 0,
            gpu_memory_peak_bytes=torch.cuda.max_memory_allocated(self._device) if gpu else 0,
        )
