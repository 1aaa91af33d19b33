"""Adapter configuration: the LoRA shape (fixed at creation) and the SDPO training knobs.

``LoraSpec`` decides which trainable slot an adapter shares (``shape_key``); ``TrainingSpec`` holds
the per-step hyper-parameters, which layer as trainer defaults < the adapter's stored defaults <
a request's overrides (``merged``). Both are built from the wire models of ``lorafleet_api``
(``Lora``, ``Training``), which hold every default and bound of the CRD's schema: a request body is
validated once, by its model, and JSON from elsewhere (a stored config, the engine's Python API) is
parsed through the same models, rejecting bad input naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from lorafleet_api import adapters, fields
from lorafleet_api.fields import LORA, TRAINING
from lorafleet_trainer import validating as v
from lorafleet_trainer.errors import InvalidInput

# A step's training overrides: the request's wire model, or JSON (the engine's Python API).
Overrides = adapters.Training | Mapping[str, Any] | None


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA shape of one adapter; immutable once the adapter exists."""

    rank: int = LORA["rank"].default
    alpha: float = LORA["alpha"].default
    dropout: float = LORA["dropout"].default
    target_modules: tuple[str, ...] = tuple(LORA["target_modules"].default)

    def __post_init__(self) -> None:
        # Direct construction normalises like from_dict does, so equal configs compare equal.
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def of(cls, lora: adapters.Lora) -> LoraSpec:
        """From a validated wire model; module order is the client's (shape_key sorts)."""
        return cls(lora.rank, lora.alpha, lora.dropout, tuple(lora.target_modules))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: str = "lora") -> LoraSpec:
        return cls.of(v.parsed(adapters.Lora, d, field))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }

    def shape_key(self) -> tuple[Any, ...]:
        """Equal keys mean the same LoRA config: same slot, same tensors. Module order is irrelevant."""
        return (self.rank, self.alpha, self.dropout, tuple(sorted(self.target_modules)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrainingSpec:
    """SDPO step settings (DESIGN.md names); every default is the CRD's (``lorafleet_api.fields``)."""

    learning_rate: float = TRAINING["learning_rate"].default
    alpha: float = TRAINING["alpha"].default
    is_clip: float = TRAINING["is_clip"].default
    is_floor: float = TRAINING["is_floor"].default
    max_grad_norm: float = TRAINING["max_grad_norm"].default
    kl_reg_weight: float = TRAINING["kl_reg_weight"].default
    teacher_top_k: int = TRAINING["teacher_top_k"].default
    teacher: str = TRAINING["teacher"].default
    teacher_ema_rate: float = TRAINING["teacher_ema_rate"].default
    teacher_template: str = TRAINING["teacher_template"].default
    teacher_custom_template: str = TRAINING["teacher_custom_template"].default

    def __post_init__(self) -> None:
        floats = (
            "learning_rate",
            "alpha",
            "is_clip",
            "is_floor",
            "max_grad_norm",
            "kl_reg_weight",
            "teacher_ema_rate",
        )
        for key in floats:
            object.__setattr__(self, key, float(getattr(self, key)))

    def merged(self, overrides: Overrides, field: str = "training") -> TrainingSpec:
        """A copy with ``overrides`` applied (a wire model, or JSON parsed through one); changes
        nothing on error."""
        if overrides is None:
            return self
        if not isinstance(overrides, adapters.Training):
            overrides = v.parsed(adapters.Training, overrides, field)
        out = replace(self, **overrides.given())
        # The rules across fields: the CRD's CEL rule (a custom teacher needs its template), and
        # the floor of the importance weight under its clip.
        problem = fields.custom_template_problem(out.teacher_template, out.teacher_custom_template)
        if problem:
            raise InvalidInput(problem, field=f"{field}.teacher_custom_template")
        if out.is_floor > out.is_clip:
            raise InvalidInput(f"must not exceed is_clip ({out.is_clip})", field=f"{field}.is_floor")
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, field: str = "training") -> TrainingSpec:
        return cls().merged(d, field)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
