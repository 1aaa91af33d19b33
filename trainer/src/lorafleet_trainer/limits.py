"""The limits of the LoRA and training fields, read from the LoraAdapter CRD's schema.

``adapter_fields.json`` is a generated copy of the CRD's ``spec.lora`` and ``spec.training`` schemas
(scripts/sync_field_contract.py; a test fails when it is stale), so a limit is written once, in
crds/, and the API server, the operator and this trainer enforce the same one. The request schemas
(``schemas.py``) and the engine's parsers (``configs.py``) both take their bounds from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import AfterValidator, Field

from lorafleet_trainer import validating as v
from lorafleet_trainer.errors import InvalidInput


@dataclass(frozen=True)
class Limit:
    """One field's schema: its JSON type and the keywords (minimum, pattern...) that bound it."""

    name: str  # camelCase, as in the CRD
    schema: dict[str, Any]

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


def snake(name: str) -> str:
    """``teacherTopK`` -> ``teacher_top_k``: the CRD is camelCase, the HTTP API snake_case."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _load() -> dict[str, dict[str, Limit]]:
    text = resources.files("lorafleet_trainer").joinpath("adapter_fields.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    return {
        section: {snake(name): Limit(name, schema) for name, schema in doc[section].items()}
        for section in ("lora", "training")
    }


LIMITS = _load()
LORA = LIMITS["lora"]
TRAINING = LIMITS["training"]


def bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic constraint arguments for one schema (a field's or a list's items)."""
    out: dict[str, Any] = {}
    if "minimum" in schema:
        out["gt" if schema.get("exclusiveMinimum") else "ge"] = schema["minimum"]
    if "maximum" in schema:
        out["lt" if schema.get("exclusiveMaximum") else "le"] = schema["maximum"]
    for ours, theirs in (("min_length", "minItems"), ("max_length", "maxItems")):
        if theirs in schema:
            out[ours] = schema[theirs]
    for ours, theirs in (("min_length", "minLength"), ("max_length", "maxLength"), ("pattern", "pattern")):
        if theirs in schema:
            out[ours] = schema[theirs]
    return out


def field(limit: Limit, default: Any = ...) -> Any:
    """A pydantic ``Field`` with the limit's bounds and description, and its default unless given."""
    value = limit.default if default is ... else default
    kwargs = {**bounds(limit.schema), "description": limit.schema.get("description")}
    if "enum" in limit.schema:  # checked by ``check``; shown in /openapi.json
        kwargs["json_schema_extra"] = {"enum": list(limit.schema["enum"])}
    if isinstance(value, list):
        return Field(default_factory=lambda: list(value), **kwargs)
    return Field(value, **kwargs)


def item_field(limit: Limit) -> Any:
    """Constraints on each item of a list field (``Annotated[str, item_field(...)]``)."""
    return Field(**bounds(limit.items))


def one_of(limit: Limit) -> Any:
    """Pydantic after-validator of an enum field: the CRD's choices and no other."""
    choices = tuple(limit.schema["enum"])

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return AfterValidator(check)


def unique(values: list[Any]) -> list[Any]:
    """Pydantic after-validator of a list-type "set" field: a repeat is refused, as the API server does."""
    if len(set(values)) != len(values):
        raise ValueError("must not repeat an item")
    return values


def check(limit: Limit, value: Any, where: str) -> Any:
    """``value`` checked against the limit, raising :class:`InvalidInput` that names ``where``."""
    s = limit.schema
    if s["type"] == "integer":
        return v.integer_in(value, where, low=s.get("minimum", -(2**63)), high=s.get("maximum"))
    if s["type"] == "number":
        return v.number_in(
            value,
            where,
            low=s.get("minimum"),
            high=s.get("maximum"),
            low_open=bool(s.get("exclusiveMinimum")),
            high_open=bool(s.get("exclusiveMaximum")),
        )
    if s["type"] == "array":
        return _check_strings(limit, value, where)
    if s["type"] == "string":
        return _check_string(limit.schema, v.string(value, where), where)
    raise TypeError(f"{limit.name}: no check for type {s['type']}")


def _check_string(schema: dict[str, Any], value: str, where: str) -> str:
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidInput(f"must be one of {', '.join(schema['enum'])}, got {value!r}", field=where)
    if len(value) > schema.get("maxLength", len(value)):
        raise InvalidInput(f"must be at most {schema['maxLength']} characters long", field=where)
    return value


def _check_strings(limit: Limit, value: Any, where: str) -> list[str]:
    s, items = limit.schema, limit.items
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidInput("must be a list of strings", field=where)
    if not s.get("minItems", 0) <= len(value) <= s.get("maxItems", len(value)):
        raise InvalidInput(f"must hold {s.get('minItems', 0)} to {s.get('maxItems')} items", field=where)
    pattern = re.compile(items["pattern"]) if "pattern" in items else None
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        v.string(item, at)
        if not items.get("minLength", 0) <= len(item) <= items.get("maxLength", len(item)):
            raise InvalidInput(
                f"must be {items.get('minLength', 0)} to {items.get('maxLength')} long", field=at
            )
        # fullmatch: the CRD's pattern is anchored, and a trailing newline must not slip past "$".
        if pattern is not None and not pattern.fullmatch(item):
            raise InvalidInput(f"must match {items['pattern']} (e.g. 'q_proj')", field=at)
    if limit.unique and len(set(value)) != len(value):
        raise InvalidInput("must not repeat an item", field=where)
    return list(value)
