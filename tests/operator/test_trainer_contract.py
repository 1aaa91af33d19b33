"""The operator's side of the trainer contract, checked against the trainer's own definitions.

The two packages never import each other; this test imports both to prove that what the operator
sends (the init body, the pod's flags and LORAFLEET_TRAINER_* variables) is what the trainer
accepts. It uses the trainer's request schema and settings only (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet_api import adapters, pools, wire
from lorafleet_operator import building
from lorafleet_operator.settings import OperatorSettings

trainer_settings = pytest.importorskip("lorafleet_trainer.settings")

ROOT = Path(__file__).resolve().parents[2]


def example_docs(kind: str) -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs += [
            d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d and d.get("kind") == kind
        ]
    return docs


@pytest.mark.parametrize("doc", example_docs("LoraAdapter"), ids=lambda d: d["metadata"]["name"])
def test_init_body_of_every_example_is_a_valid_trainer_init(doc: dict[str, Any]) -> None:
    body = wire.init_request(adapters.parse_spec(doc), 3).model_dump(mode="json", exclude_none=True)
    parsed = wire.InitRequest.model_validate(body)
    assert parsed.epoch == 3
    assert parsed.lora.rank == (doc["spec"].get("lora") or {}).get("rank", 8)


@pytest.mark.parametrize("doc", example_docs("TrainerPool"), ids=lambda d: d["metadata"]["name"])
def test_pod_flags_and_env_are_trainer_settings(doc: dict[str, Any]) -> None:
    doc = {**doc, "metadata": {**doc["metadata"], "namespace": "ns"}}
    container = building.build_pod(pools.parse(doc), 0, OperatorSettings())["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    values: dict[str, Any] = {}
    for flag, value in zip(args[1::2], args[2::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        assert name in trainer_settings.TrainerSettings.model_fields, flag
        values[name] = value
    for item in container["env"]:
        if item["name"].startswith(trainer_settings.ENV_PREFIX):
            name = item["name"].removeprefix(trainer_settings.ENV_PREFIX).lower()
            assert name in trainer_settings.TrainerSettings.model_fields, item["name"]
            # A downward-API value (the CPU request in millicores) is filled in by the kubelet.
            values[name] = item.get("value", "2000")
    values.pop("auth_token_file", None)  # a file that exists only inside the pod
    parsed = trainer_settings.TrainerSettings(**values)
    assert parsed.cache_capacity == pools.parse(doc).spec.cache_capacity_bytes()
