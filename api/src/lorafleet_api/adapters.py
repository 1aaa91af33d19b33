"""A LoraAdapter's settings as typed models: one definition for the CRD, the trainer and clients.

``Lora``, ``Training``, ``CacheOptions`` and ``AdapterServing`` are both what a LoraAdapter's
``spec`` holds and what the trainer's init and distill requests carry: their fields are snake_case
on the wire, and read the CRD's camelCase names when a custom resource is parsed (``parse_spec``),
so the operator parses a LoraAdapter into the very models it sends. ``AdapterSpec`` is the whole
``spec``. Every bound, pattern and default is the CRD's (``fields``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lorafleet_api import fields
from lorafleet_api.fields import LORA, TRAINING, Limit, spec_field

# Strict: a JSON string is never silently turned into a number. Frozen: parsed once, then shared.
# By name (snake_case) on the wire; ``parse_spec`` validates by alias (the CRD's camelCase) instead.
_SETTINGS = ConfigDict(
    strict=True,
    extra="forbid",
    allow_inf_nan=False,
    frozen=True,
    validate_by_name=True,
    validate_by_alias=False,
)

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _field(limit: Limit, default: Any = ...) -> Any:
    """A field of ``limit``: snake_case on the wire, the CRD's camelCase name as its alias."""
    return fields.field(limit, default, validation_alias=limit.name)


ModuleName = Annotated[str, fields.item_field(LORA["target_modules"])]
TemplateName = Annotated[str, fields.one_of(TRAINING["teacher_template"])]
TeacherKind = Annotated[str, fields.one_of(TRAINING["teacher"])]
ServedName = Annotated[str, Field(**fields.bounds(spec_field("LoraAdapter", "serving.name").schema))]
DeletionPolicy = Annotated[str, fields.one_of(spec_field("LoraAdapter", "deletionPolicy"))]


class Lora(BaseModel):
    """The LoRA shape of an adapter; fixed once the adapter exists."""

    model_config = _SETTINGS

    rank: int = _field(LORA["rank"])
    alpha: float = _field(LORA["alpha"])
    dropout: float = _field(LORA["dropout"])
    target_modules: Annotated[list[ModuleName], AfterValidator(fields.unique)] = _field(
        LORA["target_modules"]
    )


class Training(BaseModel):
    """SDPO step settings; every field is optional and falls back to the adapter's, then the CRD's,
    default (``TrainingSpec.merged`` in the trainer)."""

    model_config = _SETTINGS

    learning_rate: float | None = _field(TRAINING["learning_rate"], None)
    alpha: float | None = _field(TRAINING["alpha"], None)
    is_clip: float | None = _field(TRAINING["is_clip"], None)
    max_grad_norm: float | None = _field(TRAINING["max_grad_norm"], None)
    kl_reg_weight: float | None = _field(TRAINING["kl_reg_weight"], None)
    is_floor: float | None = _field(TRAINING["is_floor"], None)
    teacher_top_k: int | None = _field(TRAINING["teacher_top_k"], None)
    teacher: TeacherKind | None = _field(TRAINING["teacher"], None)
    teacher_ema_rate: float | None = _field(TRAINING["teacher_ema_rate"], None)
    teacher_template: TemplateName | None = _field(TRAINING["teacher_template"], None)
    teacher_custom_template: str | None = _field(TRAINING["teacher_custom_template"], None)

    def given(self) -> dict[str, Any]:
        """The fields set to a value, snake_case."""
        return self.model_dump(exclude_none=True)


class CacheOptions(BaseModel):
    """How the trainer's CPU cache treats this adapter (``spec.cache``)."""

    model_config = _SETTINGS

    pinned: bool = fields.field(spec_field("LoraAdapter", "cache.pinned"))


class AdapterServing(BaseModel):
    """``spec.serving``: the adapter's model name on the pool's inference servers."""

    model_config = _SETTINGS

    name: ServedName | None = fields.field(spec_field("LoraAdapter", "serving.name"))


class AdapterSpec(BaseModel):
    """What a LoraAdapter asks for: its ``spec``, as the CRD defines it (camelCase)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    pool: str = fields.field(spec_field("LoraAdapter", "pool"))
    lora: Lora = Field(default_factory=Lora)
    training: Training = Field(default_factory=Training)
    cache: CacheOptions = Field(default_factory=CacheOptions)
    serving: AdapterServing = Field(default_factory=AdapterServing)
    deletion_policy: DeletionPolicy = fields.field(
        spec_field("LoraAdapter", "deletionPolicy"), validation_alias="deletionPolicy"
    )

    @model_validator(mode="after")
    def _custom_teacher_has_template(self) -> AdapterSpec:
        problem = fields.custom_template_problem(
            self.training.teacher_template, self.training.teacher_custom_template
        )
        if problem:
            raise ValueError(f"training.teacherCustomTemplate: {problem}")
        return self

    def served_name(self, name: str) -> str:
        """The adapter's model name on its pool's inference servers."""
        return self.serving.name or name


def parse_spec(body: dict[str, Any]) -> AdapterSpec:
    """A LoraAdapter body's spec (camelCase); raises pydantic.ValidationError naming the bad field."""
    return AdapterSpec.model_validate(body.get("spec") or {}, by_alias=True, by_name=False)
