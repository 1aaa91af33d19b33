"""Adapter configuration: the LoRA shape (fixed at creation) and the SDPO training knobs.

``LoraSpec`` decides which trainable slot an adapter shares (``shape_key``); ``TrainingSpec`` holds
the per-step hyper-parameters, which layer as trainer defaults < the adapter's stored defaults <
a request's overrides (``merged``). Both parse snake_case JSON and reject bad input naming the field;
every default and bound comes from the CRD's schema through ``limits`` (one contract, not a copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from lorafleet_trainer import limits
from lorafleet_trainer import validating as v
from lorafleet_trainer.errors import InvalidInput
from lorafleet_trainer.limits import LORA, TRAINING


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
    def from_dict(cls, d: Mapping[str, Any], field: str = "lora") -> LoraSpec:
        d = v.require_mapping(d, field)
        v.reject_unknown(d, set(LORA), field)
        default = cls()
        checked = {
            key: limits.check(limit, d.get(key, getattr(default, key)), f"{field}.{key}")
            for key, limit in LORA.items()
        }
        # Kept in the client's order (so error indexes match the request); shape_key sorts.
        return cls(**checked)

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
    """SDPO step settings (DESIGN.md names); every default is the CRD's (``adapter_fields.json``)."""

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

    def merged(self, overrides: Mapping[str, Any] | None, field: str = "training") -> TrainingSpec:
        """A copy with ``overrides`` applied; validates every given value, changes nothing on error."""
        if overrides is None:
            return self
        overrides = v.require_mapping(overrides, field)
        v.reject_unknown(overrides, set(TRAINING), field)
        checked = {
            key: limits.check(TRAINING[key], value, f"{field}.{key}") for key, value in overrides.items()
        }
        out = replace(self, **checked)
        # The one rule across fields (the CRD states it in CEL): a custom teacher needs its template.
        if out.teacher_template == "custom" and "{feedback}" not in out.teacher_custom_template:
            raise InvalidInput(
                "must hold a {feedback} placeholder when teacher_template is custom",
                field=f"{field}.teacher_custom_template",
            )
        if out.is_floor > out.is_clip:
            raise InvalidInput(f"must not exceed is_clip ({out.is_clip})", field=f"{field}.is_floor")
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, field: str = "training") -> TrainingSpec:
        return cls().merged(d, field)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
