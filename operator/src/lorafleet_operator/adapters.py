"""The LoraAdapter spec as a typed model, and its translation into the trainer's init request.

The CRD uses camelCase and the trainer's HTTP API uses snake_case; this module is the one place
that maps one onto the other, so a renamed field shows up as one failing unit test.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Lora(_Spec):
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], alias="targetModules")


class Training(_Spec):
    learning_rate: float | None = Field(default=None, alias="learningRate", gt=0)
    alpha: float | None = Field(default=None, ge=0, le=1)
    is_clip: float | None = Field(default=None, alias="isClip", gt=0)
    max_grad_norm: float | None = Field(default=None, alias="maxGradNorm", gt=0)
    kl_reg_weight: float | None = Field(default=None, alias="klRegWeight", ge=0)
    teacher_top_k: int | None = Field(default=None, alias="teacherTopK", ge=1)


class Cache(_Spec):
    pinned: bool = False


class AdapterSpec(_Spec):
    """What a LoraAdapter asks for."""

    pool: str = Field(min_length=1)
    lora: Lora = Field(default_factory=Lora)
    training: Training = Field(default_factory=Training)
    cache: Cache = Field(default_factory=Cache)
    deletion_policy: Literal["Retain", "Delete"] = Field(default="Retain", alias="deletionPolicy")


def parse_spec(body: dict[str, Any]) -> AdapterSpec:
    """Parse a LoraAdapter body's spec; raises pydantic.ValidationError naming the bad field."""
    return AdapterSpec.model_validate(body.get("spec") or {})


def init_request(spec: AdapterSpec, epoch: int) -> dict[str, Any]:
    """The body of ``PUT /v1/adapters/{ns}/{name}``: snake_case, training fields only when set (the
    trainer's own defaults fill the rest), and the cache pinning from ``spec.cache``."""
    body: dict[str, Any] = {
        "lora": spec.lora.model_dump(by_alias=False),
        "epoch": epoch,
        "cache": {"pinned": spec.cache.pinned},
    }
    training = spec.training.model_dump(by_alias=False, exclude_none=True)
    if training:
        body["training"] = training
    return body
