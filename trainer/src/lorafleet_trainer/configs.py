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
    """SDPO step hyper-parameters (DESIGN.md names); the defaults are the trainer's own."""

    learning_rate: float = 1e-4
    alpha: float = 0.5
    is_clip: float = 5.0
    max_grad_norm: float = 1.0
    kl_reg_weight: float = 0.0
    teacher_top_k: int = 100

    def merged(self, overrides: Mapping[str, Any] | None, field: str = "training") -> TrainingSpec:
        """A copy with ``overrides`` applied; validates every given value, changes nothing on error."""
        if overrides is None:
            return self
        overrides = v.require_mapping(overrides, field)
        v.reject_unknown(overrides, set(TRAINING), field)
        checked = {
            key: limits.check(TRAINING[key], value, f"{field}.{key}") for key, value in overrides.items()
        }
        return replace(self, **checked)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, field: str = "training") -> TrainingSpec:
        return cls().merged(d, field)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
