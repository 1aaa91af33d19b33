"""Trainable LoRA slots: one PEFT adapter per distinct LoRA shape, wrapped onto the base model once.

PEFT injects LoRA layers into the base model in place, so wrapping it again per step would stack
wrappers and contaminate the base. Instead the model is wrapped the first time a slot is needed and
each new LoRA shape adds one more named PEFT adapter (``slot0``, ``slot1``, ...). Every slot owns one
AdamW and one state bundle (``bundles``) that its parameters and moments are views of; an adapter is
trained by copying its bundle into the slot's (one copy) and snapshotting it out after the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorafleet_trainer.engine.bundles import Layout, StateBundle
from lorafleet_trainer.errors import NonFiniteLoss
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec

# Decay would shrink an adapter a little on every step, so rarely-trained adapters would drift
# with step count rather than feedback; the LoRA update is regularised by kl_reg_weight instead.
WEIGHT_DECAY = 0.0


def peft_config(lora: LoraSpec, base_model: str) -> Any:
    import peft

    # PEFT annotates lora_alpha as int but scales by alpha / r in floats; keep integral alphas int
    # so the written adapter_config.json looks like any other.
    kwargs: dict[str, Any] = {"lora_alpha": int(lora.alpha) if lora.alpha.is_integer() else lora.alpha}
    return peft.LoraConfig(
        r=lora.rank,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        **kwargs,
    )


def adapter_config_dict(lora: LoraSpec, base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT and vLLM read, as plain JSON types."""

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if hasattr(value, "value") and isinstance(value.value, str):  # enums such as PeftType
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in peft_config(lora, base_model).to_dict().items()}


def linear_module_names(model: nn.Module) -> set[str]:
    """Leaf names of the base model's Linear layers: the valid ``target_modules``."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


class LoraSlot:
    """One PEFT adapter inside the wrapped model plus its AdamW; holds one adapter's state at a time.

    The slot's parameters and moments are views into one :class:`StateBundle` (``state``), so a
    restore and a snapshot are one copy each. The slot alone writes ``state``'s label, the token
    saying which adapter version it holds: a restore sets it, an update clears it (the slot is then
    ahead of every copy), a committed step sets it again and a release (offload) clears it.
    """

    def __init__(
        self, name: str, lora: LoraSpec, params: dict[str, nn.Parameter], home: torch.device, pin: bool
    ) -> None:
        self.name = name
        self.lora = lora
        self.layout = Layout.of({k: p.shape for k, p in params.items()})
        self.keys = self.layout.keys
        self.params = params
        self.pin = pin  # snapshot buffers are page-locked when the state lives on a GPU
        ordered = [params[k] for k in self.keys]
        self.optimizer = torch.optim.AdamW(ordered, lr=1e-4, weight_decay=WEIGHT_DECAY)
        for p in ordered:
            # Created now so the optimizer never allocates lazily; the moments are placed below.
            self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32)}
        # Where the state rests between steps: the device in ``keep`` (and on the CPU), a host
        # placeholder when offloading (each step then places a device copy, see ``place``).
        self.home = StateBundle.empty(self.layout, home)
        self.state = self.home
        self.place(self.home)
        self.spare: StateBundle | None = None  # the next snapshot's host buffer, reused
        self.restores = 0

    @property
    def state_bytes(self) -> int:
        return self.layout.nbytes

    @torch.no_grad()
    def place(self, bundle: StateBundle) -> None:
        """Point the parameters and AdamW moments at ``bundle``'s views (no copy)."""
        weights, exp_avg, exp_avg_sq = bundle.weights, bundle.exp_avg, bundle.exp_avg_sq
        for k in self.keys:
            p = self.params[k]
            p.data = weights[k]
            p.grad = None
            state = self.optimizer.state[p]
            state["exp_avg"] = exp_avg[k]
            state["exp_avg_sq"] = exp_avg_sq[k]
        self.state = bundle

    def release(self) -> None:
        """Back to the home buffer after an offloaded step; the device copy is dropped."""
        self.place(self.home)
        self.home.label(None)

    def restore(self, source: StateBundle, *, reuse: bool = True) -> bool:
        """Make the slot hold ``source``'s state; False when it already held exactly that version
        (and ``reuse`` allows trusting that)."""
        held = source.adapter is not None and self.state.has(source.adapter, source.version, source.epoch)
        if reuse and held:
            return False
        self.restores += 1
        self.state.copy_from(source, non_blocking=True)
        self._set_step(source.step)
        return True

    def _set_step(self, step: int) -> None:
        self.state.step = step
        for k in self.keys:
            # AdamW keeps its step count as a host scalar, as torch expects: no device traffic.
            self.optimizer.state[self.params[k]]["step"].fill_(float(step))

    def begin_update(self) -> None:
        """From here until ``commit`` the slot is ahead of every copy of the adapter."""
        self.state.label(None)

    @torch.no_grad()
    def stepped(self, ema_rate: float) -> None:
        """AdamW applied one step (its own step tensors advanced; the bundle's count follows), and
        the EMA of the weights moves ``ema_rate`` of the way towards them."""
        self.state.step += 1
        self.state.section("e").lerp_(self.state.section("w"), ema_rate)

    @contextmanager
    def teaching(self) -> Iterator[None]:
        """The adapter's layers carry the EMA of its weights for the duration (the EMA teacher);
        the weights are put back on the way out, whatever happened."""
        weights, ema = self.state.section("w"), self.state.section("e")
        saved = weights.clone()
        with torch.no_grad():
            weights.copy_(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                weights.copy_(saved)

    @torch.no_grad()
    def snapshot(self, adapter: AdapterId, version: int, epoch: int) -> StateBundle:
        """The slot's state as a host bundle labelled with the new version: one copy.

        The weights' finiteness is read in the same wait that completes the copy, so a step that
        made a weight non-finite is refused without a second synchronisation.
        """
        spare = self.spare
        # A bundle read from storage (a cache miss) is pageable: a copy into it would wait.
        if spare is None or spare.layout != self.layout or (self.pin and not spare.flat.is_pinned()):
            spare = StateBundle.empty(self.layout, "cpu", pin=self.pin)
        self.spare = None
        spare.copy_from(self.state, non_blocking=True)
        finite = bool(torch.isfinite(self.state.section("w")).all())  # waits for the copy too
        if not finite:
            self.spare = spare
            raise NonFiniteLoss(
                "the update made a weight non-finite; nothing was committed", field="training"
            )
        spare.label(adapter, version, epoch)
        return spare

    def commit(self, snapshot: StateBundle, spare: StateBundle | None) -> None:
        """The snapshot is durable: the slot holds that version; ``spare`` is the next buffer."""
        self.state.label(snapshot.adapter, snapshot.version, snapshot.epoch)
        self.spare = spare

    def initial_state(self, adapter: AdapterId) -> StateBundle:
        """Deterministic initial state for ``adapter``: a function of its id and LoRA config only.

        A is drawn uniformly in +-1/sqrt(fan_in) (the usual LoRA init), B is zero so the adapter
        starts as the identity; moments are zero and the step is 0.
        """
        ident = json.dumps([str(adapter), self.lora.to_dict()], sort_keys=True).encode()
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(ident).digest()[:8], "little"))
        bundle = StateBundle.empty(self.layout)
        bundle.flat.zero_()
        for k, w in bundle.weights.items():
            if ".lora_A." in k:
                bound = 1.0 / math.sqrt(w.shape[1])
                w.copy_(torch.rand(tuple(w.shape), generator=gen, dtype=torch.float32) * (2 * bound) - bound)
        bundle.section("e").copy_(bundle.section("w"))
        return bundle


class SlotManager:
    """Wraps the base model with PEFT once and hands out one slot per LoRA shape."""

    def __init__(self, model: nn.Module, base_model_id: str, home: torch.device, pin: bool) -> None:
        self.base = model
        self.base_model_id = base_model_id
        self.home = home  # where slot state rests between steps (see LoraSlot.home)
        self.pin = pin
        self.peft_model: Any = None
        self._slots: dict[tuple[Any, ...], LoraSlot] = {}
        self.active: LoraSlot | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def slots(self) -> list[LoraSlot]:
        return list(self._slots.values())

    def slot_for(self, lora: LoraSpec) -> LoraSlot:
        key = lora.shape_key()
        slot = self._slots.get(key)
        if slot is None:
            slot = self._create(lora)
            self._slots[key] = slot
        return slot

    def _create(self, lora: LoraSpec) -> LoraSlot:
        import peft

        name = f"slot{len(self._slots)}"
        # PEFT warns when this differs from the loaded model's own path; the stored
        # adapter_config.json names the model id users gave instead (adapter_config_dict).
        config = peft_config(lora, str(getattr(self.base, "name_or_path", "") or self.base_model_id))
        with warnings.catch_warnings():
            # PEFT 0.21 probes a transformers attribute that transformers 5.24 marks deprecated.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if self.peft_model is None:
                self.peft_model = peft.get_peft_model(self.base, config, adapter_name=name)
            else:
                self.peft_model.add_adapter(name, config)
        marker = f".{name}."
        params = {
            n.replace(marker, "."): p
            for n, p in self.peft_model.named_parameters()
            if marker in n and (".lora_A." in n or ".lora_B." in n)
        }
        if not params:
            raise ValueError(f"LoRA config {lora.to_dict()} created no trainable parameters")
        slot = LoraSlot(name, lora, params, self.home, self.pin)
        self.active = None
        return slot

    def activate(self, slot: LoraSlot) -> None:
        """Make ``slot`` the adapter PEFT applies (and the only one with gradients)."""
        if self.active is not slot:
            self.peft_model.base_model.set_adapter(slot.name)
            self.active = slot
