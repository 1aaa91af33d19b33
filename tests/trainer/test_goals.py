"""The example feedback goals (examples/goals) are well formed: each names an adapter of
examples/adapters.yaml, and its requests are ones the trainer accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet_trainer import schemas

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOALS = sorted((EXAMPLES / "goals").glob("*.json"))


def test_every_example_adapter_has_a_goal() -> None:
    adapters = [d["metadata"]["name"] for d in yaml.safe_load_all((EXAMPLES / "adapters.yaml").read_text())]
    assert sorted(p.stem for p in GOALS) == sorted(adapters)


@pytest.mark.parametrize("path", GOALS, ids=lambda p: p.stem)
def test_a_goal_makes_valid_requests(path: Path) -> None:
    goal: dict[str, Any] = json.loads(path.read_text())
    assert goal["adapter"] == path.stem
    assert goal["feedback"] and goal["questions"] and goal["held_out"] not in goal["questions"]
    assert goal["towards"] != goal["away"]
    assert set(goal["check"]) <= {"marker_words", "max_words"} and goal["check"]
    schemas.Training.model_validate(goal["training"])
    for question in [*goal["questions"], goal["held_out"]]:
        messages = [{"role": "user", "content": question}]
        schemas.GenerateRequest.model_validate({"messages": messages, "max_tokens": goal["max_tokens"]})
    assert 1 <= goal["steps"] <= 50
