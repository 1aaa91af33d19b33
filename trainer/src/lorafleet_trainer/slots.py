"""Trainable LoRA slots: one PEFT adapter per distinct LoRA shape, wrapped onto the base model once.

PEFT injects LoRA layers into the base model in place, so wrapping it again per step would stack
wrappers and contaminate the base. Instead the model is wrapped the first time a slot is needed and
each new LoRA shape adds one more named PEFT adapter (``slot0``, ``slot1``, ...). Every slot owns one
AdamW whose state is created up front; an adapter is trained by copying its weights, moments and
step into the slot's tensors in place and copying them back out after the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lorafleet_trainer.configs import LoraSpec
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.storage import AdapterTensors

# Decay would shrink an adapter a little on every step, so rarely-trained adapters would drift
# with step count rather than feedback; the LoRA update is regularised by kl_reg_weight instead.
WEIGHT_DECAY = 0.0
STEP_KEY = "step"


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
    """One PEFT adapter inside the wrapped model plus its AdamW; holds one adapter's state at a time."""

    def __init__(self, name: str, lora: LoraSpec, params: dict[str, nn.Parameter]) -> None:
        self.name = name
        self.lora = lora
        self.keys = sorted(params)
        self.params = params
        ordered = [params[k] for k in self.keys]
        self.optimizer = torch.optim.AdamW(ordered, lr=1e-4, weight_decay=WEIGHT_DECAY)
        for p in ordered:
            # Created now so restore can copy into it and the optimizer never lazily allocates.
            self.optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        self._step = torch.zeros(1, dtype=torch.int64)
        # (adapter, version, epoch) whose exact state the slot holds, or None when unknown/dirty.
        # Lets consecutive steps of one adapter skip a restore copy that would change nothing.
        self.holds: tuple[AdapterId, int, int] | None = None
        self.restores = 0

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat().values())

    def _state(self, key: str) -> dict[str, torch.Tensor]:
        return self.optimizer.state[self.params[key]]

    def flat(self) -> dict[str, torch.Tensor]:
        """Live views of the slot's state, the layout cache entries copy: w./m./v. + step."""
        out: dict[str, torch.Tensor] = {}
        for k in self.keys:
            out[f"w.{k}"] = self.params[k].data
            out[f"m.{k}"] = self._state(k)["exp_avg"]
            out[f"v.{k}"] = self._state(k)["exp_avg_sq"]
        self._step.fill_(int(self._state(self.keys[0])["step"].item()))
        out[STEP_KEY] = self._step
        return out

    def _set_step(self, step: int) -> None:
        for k in self.keys:
            self._state(k)["step"].fill_(float(step))

    @torch.no_grad()
    def load_flat(self, source: Mapping[str, torch.Tensor]) -> None:
        """Copy a cache entry's state into the slot, in place."""
        self.restores += 1
        for k in self.keys:
            self.params[k].data.copy_(source[f"w.{k}"], non_blocking=True)
            self._state(k)["exp_avg"].copy_(source[f"m.{k}"], non_blocking=True)
            self._state(k)["exp_avg_sq"].copy_(source[f"v.{k}"], non_blocking=True)
        self._set_step(int(source[STEP_KEY].item()))

    @torch.no_grad()
    def load_tensors(self, tensors: AdapterTensors) -> None:
        """Copy state read from storage into the slot, in place."""
        self.restores += 1
        if sorted(tensors.weights) != self.keys:
            raise ValueError(f"stored tensors do not match slot {self.name} (LoRA layout differs)")
        for k in self.keys:
            self.params[k].data.copy_(tensors.weights[k])
            self._state(k)["exp_avg"].copy_(tensors.exp_avg[k])
            self._state(k)["exp_avg_sq"].copy_(tensors.exp_avg_sq[k])
        self._set_step(tensors.step)

    def export(self) -> AdapterTensors:
        """The slot's state as host tensors for persisting (a view on CPU, a copy from a GPU)."""
        return AdapterTensors(
            weights={k: self.params[k].data.cpu() for k in self.keys},
            exp_avg={k: self._state(k)["exp_avg"].cpu() for k in self.keys},
            exp_avg_sq={k: self._state(k)["exp_avg_sq"].cpu() for k in self.keys},
            step=int(self._state(self.keys[0])["step"].item()),
        )

    def initial_tensors(self, adapter: AdapterId) -> AdapterTensors:
        """Deterministic initial state for ``adapter``: a function of its id and LoRA config only.

        A is drawn uniformly in +-1/sqrt(fan_in) (the usual LoRA init), B is zero so the adapter
        starts as the identity; moments are zero and the step is 0.
        """
        ident = json.dumps([str(adapter), self.lora.to_dict()], sort_keys=True).encode()
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(ident).digest()[:8], "little"))
        weights: dict[str, torch.Tensor] = {}
        for k in self.keys:
            p = self.params[k]
            if ".lora_A." in k:
                bound = 1.0 / math.sqrt(p.shape[1])
                w = torch.rand(tuple(p.shape), generator=gen, dtype=torch.float32) * (2 * bound) - bound
                weights[k] = w.to(p.dtype)
            else:
                weights[k] = torch.zeros(tuple(p.shape), dtype=p.dtype)
        zeros = {k: torch.zeros(tuple(self.params[k].shape), dtype=self.params[k].dtype) for k in self.keys}
        return AdapterTensors(weights, zeros, {k: z.clone() for k, z in zeros.items()}, step=0)


class SlotManager:
    """Wraps the base model with PEFT once and hands out one slot per LoRA shape."""

    def __init__(self, model: nn.Module, base_model_id: str) -> None:
        self.base = model
        self.base_model_id = base_model_id
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
        slot = LoraSlot(name, lora, params)
        self.active = None
        return slot

    def activate(self, slot: LoraSlot) -> None:
        """Make ``slot`` the adapter PEFT applies (and the only one with gradients)."""
        if self.active is not slot:
            self.peft_model.base_model.set_adapter(slot.name)
            self.active = slot
