"""kubeconform schemas made from CustomResourceDefinitions: OpenAPI v3 (structural) to JSON Schema.

A CRD's ``openAPIV3Schema`` is almost a draft-4 JSON Schema. What differs is said by the
``x-kubernetes-*`` extensions and ``nullable``; this turns each into what a JSON Schema validator
understands, the way the API server reads it: ``int-or-string`` is either, ``nullable`` admits
``null``, ``preserve-unknown-fields`` keeps any field, and, with ``strict``, an object that lists its
properties refuses others (the API server would silently prune them: a typo the user never sees).
The files land where kubeconform's ``{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json``
schema location looks for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

DRAFT4 = "http://json-schema.org/draft-04/schema#"
# Extensions that constrain nothing a manifest checker can judge (list merge keys, CEL, maps).
_DROPPED = {
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
    "x-kubernetes-validations", "x-kubernetes-embedded-resource",
}  # fmt: skip


def convert(schema: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """One OpenAPI v3 schema node (and everything under it) as JSON Schema."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED or key in ("nullable", "x-kubernetes-int-or-string"):
            continue
        if key == "x-kubernetes-preserve-unknown-fields":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: convert(sub, strict=strict) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = convert(value, strict=strict)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(sub, strict=strict) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    open_ended = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
    if strict and "properties" in schema and not open_ended:
        out["additionalProperties"] = False
    return out


def write_schemas(crd_files: list[Path], into: Path, *, strict: bool = True) -> list[Path]:
    """A JSON schema per served version of each CRD in ``crd_files``; returns the files written."""
    written = []
    for path in crd_files:
        for crd in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = convert(version["schema"]["openAPIV3Schema"], strict=strict)
                # kind and apiVersion are fixed for this file; metadata is checked by the API server.
                schema["$schema"] = DRAFT4
                target = into / spec["group"] / f"{spec['names']['kind'].lower()}_{version['name']}.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(schema, indent=1), encoding="utf-8")
                written.append(target)
    return written


def write_kubernetes_schemas(strict_dir: Path, kinds: set[tuple[str, str]], into: Path) -> list[Path]:
    """Self-contained kubeconform schemas for the built-in ``(apiVersion, kind)`` pairs in ``kinds``.

    kubernetes-validate's strict schemas point into a shared ``/api/_definitions.json`` that only its
    own resolver finds; each file written here carries those definitions itself, under ``$defs``.
    """
    definitions = json.loads((strict_dir / "_definitions.json").read_text(encoding="utf-8"))
    written = []
    for api_version, kind in sorted(kinds):
        group, _, version = api_version.rpartition("/")
        suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
        name = f"{kind.lower()}{suffix}.json"
        source = strict_dir / name
        if not source.exists():
            continue  # a custom resource: write_schemas makes its schema
        text = source.read_text(encoding="utf-8").replace('"/api/_definitions.json#/', '"#/')
        schema = json.loads(text)
        schema["$defs"] = definitions["$defs"]
        schema["$schema"] = definitions["$schema"]
        schema.pop("$id", None)
        target = into / name
        target.write_text(json.dumps(schema), encoding="utf-8")
        written.append(target)
    return written
