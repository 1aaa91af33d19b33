"""The example feedback goals (examples/goals) are well formed: each names an adapter of
examples/adapters.yaml and a goal suite of examples/eval, and its requests are ones the trainer accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet_api import wire

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOALS = sorted((EXAMPLES / "goals").glob("*.json"))


def test_every_example_adapter_has_a_goal() -> None:
    adapters = [d["metadata"]["name"] for d in yaml.safe_load_all((EXAMPLES / "adapters.yaml").read_text())]
    assert sorted(p.stem for p in GOALS) == sorted(adapters)


@pytest.mark.parametrize("path", GOALS, ids=lambda p: p.stem)
def test_a_goal_makes_valid_requests(path: Path) -> None:
    """The requests the goal's client sends (goals.py) are ones this trainer's schemas accept."""
    goal: dict[str, Any] = json.loads(path.read_text())
    assert goal["adapter"] == path.stem and 1 <= goal["steps"] <= 50
    suite: dict[str, Any] = json.loads((EXAMPLES / "eval" / f"{goal['suite']}.json").read_text())
    wire.Training.model_validate(goal.get("training", {}))
    train = [{"messages": [{"role": "user", "content": q}]} for q in suite["train"]]
    held_out = [{"messages": [{"role": "user", "content": h["question"]}]} for h in suite["held_out"]]
    wire.RolloutsRequest.model_validate(
        {"prompts": train, "n": 2, "temperature": 1.0, "max_tokens": suite["max_tokens"], "seed": 1,
         "feedback": suite["feedback"]}
    )  # fmt: skip
    wire.RolloutsRequest.model_validate(
        {"prompts": held_out, "temperature": 0.0, "max_tokens": suite["max_tokens"]}
    )
    wire.TeacherRequest.model_validate(
        {
            "messages": held_out[0]["messages"],
            "feedback": suite["feedback"],
            "max_tokens": suite["max_tokens"],
        }
    )
