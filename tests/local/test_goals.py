"""The example feedback goals run through a real trainer's HTTP API (builtin:tiny: quick; the real
model's learning is tested in tests/trainer/service/test_learning.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.trainer.service import live

from lorafleet_local import goals, verifiers

LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live.LiveTrainer]:
    server = live.start_trainer(tmp_path_factory.mktemp("goals"))
    yield server
    server.stop()


def _recording(client: Any, calls: list[tuple[str, str, Any]]) -> goals.Call:
    def call(method: str, url: str, body: Any) -> tuple[int, Any]:
        calls.append((method, url.rsplit("/", 1)[1], body))
        response = client.request(method, url, json=body)
        return response.status_code, response.json()

    return call


def test_a_goal_previews_judges_then_steps_on_fresh_rollouts(trainer: live.LiveTrainer) -> None:
    client = trainer.client(timeout=120)
    route = "/v1/adapters/goals/bob"
    assert client.put(route, json={"lora": LORA, "epoch": 1}).status_code == 201
    calls: list[tuple[str, str, Any]] = []
    goal = dataclasses.replace(goals.Goal.of("bob"), steps=3)
    seen: list[int] = []
    run = goals.run_goal(
        _recording(client, calls), route, goal, lambda r: seen.append(len(r.losses)), every=2
    )
    assert [(m, what) for m, what, _ in calls] == [
        ("POST", "teacher"),
        ("POST", "rollouts"),  # the held-out answers before
        *[("POST", "rollouts"), ("POST", "distill")] * 2,
        ("POST", "rollouts"),  # judged at step 2
        ("POST", "rollouts"),
        ("POST", "distill"),
        ("POST", "rollouts"),  # and after the last step
    ]
    rollout_bodies = [body for _, what, body in calls if what == "rollouts" and body["temperature"] > 0]
    # Fresh rollouts every step, several per question, each step with its own seed.
    assert len(rollout_bodies) == 3 and len({b["seed"] for b in rollout_bodies}) == 3
    assert all(b["n"] == goal.loop.n >= 2 and b["feedback"] == goal.suite.feedback for b in rollout_bodies)
    distilled = [body for _, what, body in calls if what == "distill"]
    assert all(len(b["samples"]) == len(goal.suite.train) * goal.loop.n for b in distilled)
    assert all(s["feedback"] == goal.suite.feedback for b in distilled for s in b["samples"])
    assert seen == [1, 2, 3] and run.version == 3 and len(run.step_ms) == len(run.rollout_ms) == 3
    assert [c.step for c in run.checkpoints] == [0, 2, 3] and [c.version for c in run.checkpoints] == [
        0,
        2,
        3,
    ]
    assert len(run.before.answers) == len(goal.suite.held_out)
    assert run.preview["teacher_text"] is not None and run.preview["positions"]


def test_reused_rollouts_sample_once(trainer: live.LiveTrainer) -> None:
    client = trainer.client(timeout=120)
    route = "/v1/adapters/goals/reused"
    assert client.put(route, json={"lora": LORA, "epoch": 1}).status_code == 201
    calls: list[tuple[str, str, Any]] = []
    goal = dataclasses.replace(
        goals.Goal.of("alice"), steps=2, loop=goals.Loop(n=1, temperature=0.0, fresh=False)
    )
    run = goals.run_goal(_recording(client, calls), route, goal)
    training_rollouts = [body for _, what, body in calls if what == "rollouts" and "feedback" in body]
    assert len(training_rollouts) == 1 and training_rollouts[0]["temperature"] == 0.0
    assert run.version == 2 and len(run.rollout_ms) == 1


def test_a_refused_call_names_the_adapter_and_the_answer(trainer: live.LiveTrainer) -> None:
    client = trainer.client(timeout=120)
    with pytest.raises(goals.GoalError, match=r"teacher carol: 404"):
        goals.run_goal(_recording(client, []), "/v1/adapters/goals/absent", goals.Goal.of("carol"))


def _checkpoint(follow: float, facts: float, degenerate: float) -> goals.Checkpoint:
    return goals.Checkpoint(0, 0, follow, facts, degenerate, None, [])


@pytest.mark.parametrize(
    ("after", "met"),
    [
        (_checkpoint(0.75, 0.9, 0.0), True),
        (_checkpoint(0.65, 0.9, 0.0), False),  # not followed often enough
        (_checkpoint(0.9, 0.7, 0.0), False),  # facts lost: 0.7 < 0.8 of the 0.9 before
        (_checkpoint(0.9, 0.9, 0.2), False),  # degenerate answers
    ],
)
def test_achieved_needs_the_goal_the_facts_and_fluency(after: goals.Checkpoint, met: bool) -> None:
    assert after.met(_checkpoint(0.0, 0.9, 0.0)) is met


def test_every_example_goal_loads_a_suite() -> None:
    for path in sorted(goals.GOALS.glob("*.json")):
        goal = goals.Goal.load(path)
        assert goal.adapter == Path(path).stem and goal.steps >= 1
        assert isinstance(goal.suite, verifiers.Suite) and len(goal.suite.held_out) >= 10


def test_the_cli_takes_the_adapters_route_or_status_endpoint_and_its_namespace() -> None:
    route = "http://127.70.0.4:8080/v1/adapters/mine/dave"
    assert goals.adapter_route(route + "/", None, "dave") == route
    assert goals.adapter_route("http://127.70.0.4:8080", "mine", "dave") == route
    with pytest.raises(ValueError, match="give --namespace"):
        goals.adapter_route("http://127.70.0.4:8080", None, "dave")
