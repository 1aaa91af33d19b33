"""The custom resources' field contract: each field's bounds, pattern, choices and default, once.

``contract.json`` is a generated copy of the ``spec`` schemas of both CRDs in crds/
(scripts/sync_field_contract.py; ``make check-crds`` and a test fail when it is stale), so a limit
is written in one place, the CRD, and the API server, the operator, the trainer and the gateway
enforce that one. The helpers below turn a field's schema into pydantic constraints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import AfterValidator, Field


@dataclass(frozen=True)
class Limit:
    """One field's schema: its JSON type and the keywords (minimum, pattern...) that bound it."""

    name: str  # camelCase, as in the CRD
    schema: dict[str, Any]
    required: bool = False  # the object holding it requires it

    @property
    def default(self) -> Any:
        return self.schema.get("default")

    @property
    def items(self) -> dict[str, Any]:
        items: dict[str, Any] = self.schema.get("items", {})
        return items

    @property
    def unique(self) -> bool:
        return self.schema.get("x-kubernetes-list-type") == "set"

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.schema.get("enum", ()))


def snake(name: str) -> str:
    """``teacherTopK`` -> ``teacher_top_k``: the CRDs are camelCase, the HTTP API snake_case."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


CONTRACT: dict[str, Any] = json.loads(
    resources.files("lorafleet_api").joinpath("contract.json").read_text(encoding="utf-8")
)


def spec_field(kind: str, path: str) -> Limit:
    """The schema of ``spec.<path>`` of ``kind`` (``"LoraAdapter"``, ``"lora.rank"``)."""
    schema: dict[str, Any] = CONTRACT[kind]
    required = False
    for part in path.split("."):
        required = part in schema.get("required", ())
        schema = schema["properties"][part]
    return Limit(path.rpartition(".")[2], schema, required)


def section(kind: str, path: str) -> dict[str, Limit]:
    """Every field of the object ``spec.<path>``, by snake_case name, in the CRD's order."""
    obj = spec_field(kind, path).schema
    required = set(obj.get("required", ()))
    return {snake(n): Limit(n, schema, n in required) for n, schema in obj["properties"].items()}


LORA = section("LoraAdapter", "lora")
TRAINING = section("LoraAdapter", "training")


def bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic constraint arguments for one schema (a field's or a list's items)."""
    out: dict[str, Any] = {}
    if "minimum" in schema:
        out["gt" if schema.get("exclusiveMinimum") else "ge"] = schema["minimum"]
    if "maximum" in schema:
        out["lt" if schema.get("exclusiveMaximum") else "le"] = schema["maximum"]
    keys = {"minItems": "min_length", "maxItems": "max_length", "minLength": "min_length"}
    keys |= {"maxLength": "max_length", "pattern": "pattern"}
    out |= {ours: schema[theirs] for theirs, ours in keys.items() if theirs in schema}
    return out


def field(limit: Limit, default: Any = ..., **extra: Any) -> Any:
    """A pydantic ``Field`` with the limit's bounds and description, and its default unless given
    (none: required, when the CRD requires it)."""
    value = default
    if value is ...:
        value = ... if limit.required and "default" not in limit.schema else limit.default
    kwargs = {**bounds(limit.schema), "description": limit.schema.get("description"), **extra}
    if limit.choices:  # checked by ``one_of``; shown in /openapi.json
        kwargs["json_schema_extra"] = {"enum": list(limit.choices)}
    if isinstance(value, (list, dict)):
        return Field(default_factory=lambda: json.loads(json.dumps(value)), **kwargs)
    return Field(value, **kwargs)


def item_field(limit: Limit) -> Any:
    """Constraints on each item of a list field (``Annotated[str, item_field(...)]``)."""
    return Field(**bounds(limit.items))


def one_of(limit: Limit) -> AfterValidator:
    """After-validator of an enum field: the CRD's choices and no other."""
    choices = limit.choices

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return AfterValidator(check)


def unique(values: list[Any]) -> list[Any]:
    """After-validator of a list-type "set" field: a repeat is refused, as the API server does."""
    if len(set(values)) != len(values):
        raise ValueError("must not repeat an item")
    return values


def custom_template_problem(template: str | None, custom: str | None) -> str | None:
    """What is wrong with the custom template of a teacher template choice, or None: the CRD's CEL
    rule for ``spec.training`` (a ``custom`` template needs a ``{feedback}`` placeholder), with the
    CRD's default template when none is chosen."""
    if (template or TRAINING["teacher_template"].default) != "custom":
        return None
    if "{feedback}" in (custom or ""):
        return None
    return "must hold a {feedback} placeholder when the teacher template is custom"
