"""The LoraAdapter spec as a typed model, and its translation into the trainer's init request.

The CRD uses camelCase and the trainer's HTTP API uses snake_case; this module is the one place
that maps one onto the other, so a renamed field shows up as one failing unit test. The LoRA and
training fields take their bounds, patterns and defaults from ``adapter_fields.json``, a generated
copy of the CRD's schema (scripts/sync_field_contract.py): the limit the API server enforces is the
one this model applies, and the trainer reads the same copy.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

_FIELDS: dict[str, dict[str, dict[str, Any]]] = json.loads(
    resources.files("lorafleet_operator").joinpath("adapter_fields.json").read_text(encoding="utf-8")
)


def _bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic constraints of one CRD schema (a field's, or a list's items)."""
    out: dict[str, Any] = {}
    if "minimum" in schema:
        out["gt" if schema.get("exclusiveMinimum") else "ge"] = schema["minimum"]
    if "maximum" in schema:
        out["lt" if schema.get("exclusiveMaximum") else "le"] = schema["maximum"]
    keys = {"minItems": "min_length", "maxItems": "max_length", "minLength": "min_length"}
    keys |= {"maxLength": "max_length", "pattern": "pattern"}
    out |= {ours: schema[theirs] for theirs, ours in keys.items() if theirs in schema}
    return out


def _field(section: str, name: str, *, optional: bool = False) -> Any:
    """A strict pydantic Field for ``spec.<section>.<name>`` (camelCase alias), from the CRD copy."""
    schema = _FIELDS[section][name]
    default = None if optional else schema.get("default")
    kwargs = {**_bounds(schema), "alias": name, "strict": True}
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), **kwargs)
    return Field(default, **kwargs)


def _unique(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("must not repeat an item")
    return values


_ModuleName = Annotated[str, Field(**_bounds(_FIELDS["lora"]["targetModules"]["items"]), strict=True)]


def _one_of(choices: list[str]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return AfterValidator(check)


_TemplateName = Annotated[str, _one_of(_FIELDS["training"]["teacherTemplate"]["enum"])]
_TeacherKind = Annotated[str, _one_of(_FIELDS["training"]["teacher"]["enum"])]


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Lora(_Spec):
    rank: int = _field("lora", "rank")
    alpha: float = _field("lora", "alpha")
    dropout: float = _field("lora", "dropout")
    target_modules: Annotated[list[_ModuleName], AfterValidator(_unique)] = _field("lora", "targetModules")


class Training(_Spec):
    learning_rate: float | None = _field("training", "learningRate", optional=True)
    alpha: float | None = _field("training", "alpha", optional=True)
    is_clip: float | None = _field("training", "isClip", optional=True)
    max_grad_norm: float | None = _field("training", "maxGradNorm", optional=True)
    kl_reg_weight: float | None = _field("training", "klRegWeight", optional=True)
    is_floor: float | None = _field("training", "isFloor", optional=True)
    teacher_top_k: int | None = _field("training", "teacherTopK", optional=True)
    teacher: _TeacherKind | None = _field("training", "teacher", optional=True)
    teacher_ema_rate: float | None = _field("training", "teacherEmaRate", optional=True)
    teacher_template: _TemplateName | None = _field("training", "teacherTemplate", optional=True)
    teacher_custom_template: str | None = _field("training", "teacherCustomTemplate", optional=True)

    @model_validator(mode="after")
    def _custom_teacher_has_template(self) -> Training:
        # The CRD's CEL rule for spec.training, with the CRD's default template when none is set.
        template = self.teacher_template or _FIELDS["training"]["teacherTemplate"]["default"]
        if template == "custom" and "{feedback}" not in (self.teacher_custom_template or ""):
            raise ValueError(
                "teacherTemplate custom needs a teacherCustomTemplate with a {feedback} placeholder"
            )
        return self


class Cache(_Spec):
    pinned: bool = False


class Serving(_Spec):
    name: str | None = Field(default=None, min_length=1, max_length=253)


class AdapterSpec(_Spec):
    """What a LoraAdapter asks for."""

    pool: str = Field(min_length=1)
    lora: Lora = Field(default_factory=Lora)
    training: Training = Field(default_factory=Training)
    cache: Cache = Field(default_factory=Cache)
    serving: Serving = Field(default_factory=Serving)
    deletion_policy: Literal["Retain", "Delete"] = Field(default="Retain", alias="deletionPolicy")


def parse_spec(body: dict[str, Any]) -> AdapterSpec:
    """Parse a LoraAdapter body's spec; raises pydantic.ValidationError naming the bad field."""
    return AdapterSpec.model_validate(body.get("spec") or {})


def served_name(spec: AdapterSpec, name: str) -> str:
    """The adapter's model name on its pool's inference servers."""
    return spec.serving.name or name


def init_request(spec: AdapterSpec, epoch: int, name: str | None = None) -> dict[str, Any]:
    """The body of ``PUT /v1/adapters/{ns}/{name}``: snake_case, training fields only when set (the
    trainer's own defaults fill the rest), the cache pinning from ``spec.cache``, and (given the
    adapter's ``name``) the name its versions are published under."""
    body: dict[str, Any] = {
        "lora": spec.lora.model_dump(by_alias=False),
        "epoch": epoch,
        "cache": {"pinned": spec.cache.pinned},
    }
    training = spec.training.model_dump(by_alias=False, exclude_none=True)
    if training:
        body["training"] = training
    if name is not None:
        body["serving"] = {"name": served_name(spec, name)}
    return body
