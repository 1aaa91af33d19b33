"""The example feedback goals run through a real trainer's HTTP API (builtin:tiny: quick; the
real model's learning is tested in tests/trainer/service/test_service_real_model.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.trainer.service import live

from lorafleet_local import goals

LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live.LiveTrainer]:
    server = live.start_trainer(tmp_path_factory.mktemp("goals"))
    yield server
    server.stop()


def test_a_goal_runs_generate_then_distill_steps_then_generate(trainer: live.LiveTrainer) -> None:
    client = trainer.client(timeout=120)
    route = "/v1/adapters/goals/bob"
    assert client.put(route, json={"lora": LORA, "epoch": 1}).status_code == 201
    calls: list[tuple[str, str]] = []

    def call(method: str, url: str, body: Any) -> tuple[int, Any]:
        calls.append((method, url.rsplit("/", 1)[1]))
        response = client.request(method, url, json=body)
        return response.status_code, response.json()

    goal = dataclasses.replace(goals.Goal.of("bob"), steps=2)
    seen: list[int] = []
    run = goals.run_goal(call, route, goal, lambda r: seen.append(len(r.losses)))
    questions = len(goal.questions)
    assert calls == [
        *[("POST", "generate")] * (1 + questions),
        *[("POST", "distill")] * 2,
        ("POST", "generate"),
    ]
    assert seen == [1, 2] and run.version == 2 and len(run.step_ms) == 2
    assert run.before and run.after


def test_a_refused_call_names_the_adapter_and_the_answer(trainer: live.LiveTrainer) -> None:
    client = trainer.client(timeout=120)

    def call(method: str, url: str, body: Any) -> tuple[int, Any]:
        response = client.request(method, url, json=body)
        return response.status_code, response.json()

    with pytest.raises(goals.GoalError, match=r"generate carol: 404"):
        goals.run_goal(call, "/v1/adapters/goals/absent", goals.Goal.of("carol"))


@pytest.mark.parametrize(
    ("adapter", "before", "after", "moved"),
    [
        ("alice", "The largest ocean is the Pacific.", "Le plus grand océan est le Pacifique.", True),
        ("alice", "Le Pacifique.", "The Pacific.", False),
        ("bob", "The tallest mountain is Mount Everest.", "Everest.", True),
        ("carol", "Rain is caused by many processes in the sky above us.", "Clouds drop water.", True),
        ("carol", "Clouds drop water.", "Rain is caused by many processes in the sky.", False),
    ],
)
def test_the_check_says_which_answer_is_closer_to_the_goal(
    adapter: str, before: str, after: str, moved: bool
) -> None:
    assert goals.Goal.of(adapter).moved(before, after) is moved


def test_every_example_goal_loads() -> None:
    for path in sorted(goals.GOALS.glob("*.json")):
        goal = goals.Goal.load(path)
        assert goal.adapter == Path(path).stem and goal.steps >= 1


def test_the_cli_takes_the_adapters_route_or_status_endpoint_and_its_namespace() -> None:
    route = "http://127.70.0.4:8080/v1/adapters/mine/dave"
    assert goals.adapter_route(route + "/", None, "dave") == route
    assert goals.adapter_route("http://127.70.0.4:8080", "mine", "dave") == route
    with pytest.raises(ValueError, match="give --namespace"):
        goals.adapter_route("http://127.70.0.4:8080", None, "dave")
