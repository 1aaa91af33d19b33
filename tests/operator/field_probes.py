"""Probe values for the LoRA and training fields, derived from the LoraAdapter CRD's schema.

Each field of ``spec.lora`` and ``spec.training`` yields its bounds and the value one past each,
its items' pattern and length limits, its list size and uniqueness, and its default. ``crd_admits``
judges a probe as the API server does (Draft 4 plus Go's regexp and list-type "set"); the
contract test compares the operator and the trainer with it, the boundary test the API server itself.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds/lorafleet.io_loraadapters.yaml"
SECTIONS = ("lora", "training")
# Every keyword a field of these sections may carry; each one below is turned into probes.
KNOWN = {
    "type", "description", "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minItems", "maxItems", "items", "pattern", "minLength", "maxLength", "x-kubernetes-list-type",
    "enum",
}  # fmt: skip
# Named values a user is likely to write, besides the ones each limit implies.
MODULE_PROBES = ["q_proj", "gate_proj", "_private", "model.layers.0.q_proj", "self_attn.q_proj",
                 "0proj", "q-proj", "q proj", "q_proj\n", ""]  # fmt: skip
EXTRA = {("lora", "rank"): [600, 16, 64]}


def openapi() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text(encoding="utf-8"))
    (version,) = doc["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def section(name: str) -> dict[str, Any]:
    sub: dict[str, Any] = openapi()["properties"]["spec"]["properties"][name]
    return sub


def snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def past(bound: float, *, up: bool, integer: bool) -> float:
    """The nearest value beyond ``bound`` (an integer's neighbour, or the next float)."""
    if integer:
        return bound + 1 if up else bound - 1
    return math.nextafter(bound, math.inf if up else -math.inf)


def number_probes(schema: dict[str, Any]) -> list[Any]:
    integer = schema["type"] == "integer"
    values: list[Any] = []
    for key, exclusive, up in (("minimum", "exclusiveMinimum", False), ("maximum", "exclusiveMaximum", True)):
        if key in schema:
            bound = schema[key]
            inside = past(bound, up=not up, integer=integer)
            values += [bound, past(bound, up=up, integer=integer)]
            if schema.get(exclusive):
                values.append(inside)
    values.append("1" if integer else "0.5")  # a string is never a number
    if integer:
        values.append(1.5)
    return values


def array_probes(schema: dict[str, Any]) -> list[Any]:
    items = schema["items"]
    unknown = set(items) - KNOWN
    assert not unknown, f"item keywords {unknown} have no probes"
    assert items["type"] == "string", "only lists of strings are probed"
    names = [f"m{i}" for i in range(max(schema.get("maxItems", 8), 2) + 1)]
    values: list[Any] = [[name] for name in MODULE_PROBES]
    if "minLength" in items:
        values += [["a" * items["minLength"]], ["a" * (items["minLength"] - 1)]]
    if "maxLength" in items:
        values += [["a" * items["maxLength"]], ["a" * (items["maxLength"] + 1)]]
    if "minItems" in schema:
        values += [names[: schema["minItems"]], names[: schema["minItems"] - 1]]
    if "maxItems" in schema:
        values += [names[: schema["maxItems"]], names[: schema["maxItems"] + 1]]
    values += [["q_proj", "q_proj"], "q_proj"]  # a repeat; a string is not a list
    return values


def probes(sec: str, name: str, schema: dict[str, Any]) -> list[Any]:
    unknown = set(schema) - KNOWN
    assert not unknown, f"spec.{sec}.{name}: keywords {unknown} have no probes"
    values: list[Any] = [schema["default"]] if "default" in schema else []
    if schema["type"] in ("integer", "number"):
        values += number_probes(schema)
    elif schema["type"] == "array":
        values += array_probes(schema)
    elif "enum" in schema:
        values += [*schema["enum"], "NotAChoice", 3]
    elif schema["type"] == "string":
        values += ["", "{feedback} then {question}", 3]
        if "maxLength" in schema:
            values += ["a" * schema["maxLength"], "a" * (schema["maxLength"] + 1)]
    else:
        pytest.fail(f"spec.{sec}.{name}: type {schema['type']} has no probes")
    return values + EXTRA.get((sec, name), [])


def fields() -> list[tuple[str, str, dict[str, Any]]]:
    return [(sec, name, sub) for sec in SECTIONS for name, sub in section(sec)["properties"].items()]


def go_pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Any:
    """The API server's regexp (Go RE2): ``$`` ends the text, never a line as in Python's ``re``."""
    if isinstance(instance, str) and not re.search(pattern.replace("$", r"\Z"), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


APISERVER = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": go_pattern})


def defaulted(sec: str, name: str, value: Any) -> dict[str, Any]:
    """``spec.<sec>`` holding the probe, with the section's other defaults filled in as the API server
    does before it evaluates the section's CEL rules."""
    props = section(sec)["properties"]
    return {**{k: p["default"] for k, p in props.items() if "default" in p}, name: value}


def cel_admits(sec: str, spec: dict[str, Any]) -> bool:
    """The training section's one CEL rule, in Python: a custom teacher needs its template."""
    if sec != "training" or spec.get("teacherTemplate") != "custom":
        return True
    template = spec.get("teacherCustomTemplate")
    return isinstance(template, str) and "{feedback}" in template


def crd_admits(sec: str, name: str, value: Any) -> bool:
    doc = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": "a"},
           "spec": {"pool": "p", sec: {name: value}}}  # fmt: skip
    if not APISERVER(openapi()).is_valid(doc) or not cel_admits(sec, defaulted(sec, name, value)):
        return False
    # A structural schema cannot say uniqueItems; the API server enforces list-type "set" instead.
    field = section(sec)["properties"][name]
    return not (field.get("x-kubernetes-list-type") == "set" and len(set(value)) != len(value))
