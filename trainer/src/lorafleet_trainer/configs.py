"""Adapter configuration: the LoRA shape (fixed at creation) and the SDPO training knobs.

``LoraSpec`` decides which trainable slot an adapter shares (``shape_key``); ``TrainingSpec`` holds
the per-step hyper-parameters, which layer as trainer defaults < the adapter's stored defaults <
a request's overrides (``merged``). Both parse snake_case JSON and reject bad input naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from lorafleet_trainer import validating as v
from lorafleet_trainer.errors import InvalidInput

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_RANK = 512


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA shape of one adapter; immutable once the adapter exists."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        # Direct construction normalises like from_dict does, so equal configs compare equal.
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: str = "lora") -> LoraSpec:
        d = v.require_mapping(d, field)
        v.reject_unknown(d, {"rank", "alpha", "dropout", "target_modules"}, field)
        default = cls()
        rank = v.integer_in(d.get("rank", default.rank), f"{field}.rank", low=1, high=MAX_RANK)
        alpha = v.number_in(d.get("alpha", default.alpha), f"{field}.alpha", low=0.0, low_open=True)
        dropout = v.number_in(
            d.get("dropout", default.dropout), f"{field}.dropout", low=0.0, high=1.0, high_open=True
        )
        modules = d.get("target_modules", list(default.target_modules))
        mfield = f"{field}.target_modules"
        if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not modules:
            raise InvalidInput("must be a non-empty list of module names", field=mfield)
        for i, name in enumerate(modules):
            if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
                raise InvalidInput("must be a module name such as 'q_proj'", field=f"{mfield}[{i}]")
        if len(set(modules)) != len(modules):
            raise InvalidInput("must not repeat a module", field=mfield)
        # Kept in the client's order (so error indexes match the request); shape_key sorts.
        return cls(rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(modules))

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


_TRAINING_FIELDS = frozenset(
    {"learning_rate", "alpha", "is_clip", "max_grad_norm", "kl_reg_weight", "teacher_top_k"}
)


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
        v.reject_unknown(overrides, _TRAINING_FIELDS, field)
        checked: dict[str, Any] = {}
        for key, value in overrides.items():
            f = f"{field}.{key}"
            if key == "learning_rate":
                checked[key] = v.number_in(value, f, low=0.0, high=1.0, low_open=True)
            elif key == "alpha":
                checked[key] = v.number_in(value, f, low=0.0, high=1.0)
            elif key in ("is_clip", "max_grad_norm"):
                checked[key] = v.number_in(value, f, low=0.0, low_open=True)
            elif key == "kl_reg_weight":
                checked[key] = v.number_in(value, f, low=0.0)
            else:
                checked[key] = v.integer_in(value, f, low=1)
        return replace(self, **checked)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, field: str = "training") -> TrainingSpec:
        return cls().merged(d, field)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
