"""Learning judged by held-out behaviour, with the shipped defaults, on the real model.

A trainer serving builtin:smollm2 on one CPU thread (so the run is the same every time on one
machine: greedy judging, seeded rollouts) trains one adapter per goal exactly as a client does
(``lorafleet_local.goals``: fresh rollouts of the current version every step, the feedback added,
one distill step) with nothing set but the LoRA shape, so every training setting is the CRD's
default. After a fixed number of steps the held-out questions (never trained on) must follow the
goal at the bar (70 %), keep their facts (80 % of before) and not break down (at most 10 %
degenerate). These fail if learning regresses, whatever the loss does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.trainer.service import live

from lorafleet_local import evaluating, goals, verifiers

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.learning]

# Goal suite -> steps: where `make eval` with the defaults met the bar (brevity at step 10, no lists
# at 15; README, "Learning"). The adapters are named as `make eval` names them, so they start from
# the same initial weights and the run is that evaluation's run.
GOALS = {"brief": 10, "no-lists": 15}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live.LiveTrainer]:
    # The user's model cache: builtin:smollm2 is converted once per machine, not once per run.
    server = live.start_trainer(
        tmp_path_factory.mktemp("learning"),
        base_model="builtin:smollm2",
        args=["--threads", "1", "--max-generate-tokens", "256"],
        ready_timeout=900,
    )
    yield server
    server.stop()


@pytest.mark.parametrize(("suite", "steps"), GOALS.items())
def test_the_goal_is_met_on_held_out_questions_with_the_defaults(
    trainer: live.LiveTrainer, suite: str, steps: int
) -> None:
    client = trainer.client(timeout=900)
    route = f"/v1/adapters/eval/defaults-{suite}"
    assert client.put(route, json={"lora": evaluating.LORA, "epoch": 1}).status_code == 201

    def call(method: str, url: str, body: Any) -> tuple[int, Any]:
        response = client.request(method, url, json=body)
        return response.status_code, response.json()

    loaded = verifiers.Suite.load(goals.SUITES / f"{suite}.json")
    run = goals.run_goal(call, route, goals.Goal(suite, loaded, steps), seed=0)
    for c in run.checkpoints:
        print(f"{suite} step {c.step:2d}: {goals.describe(c)}  e.g. {c.answers[0]!r}")
    assert run.before.follow <= 0.1, "the base model already follows this goal: it tests nothing"
    assert run.achieved, (
        f"{suite} after {steps} steps: {goals.describe(run.after)} (before: {goals.describe(run.before)});"
        f" answers: {run.after.answers}"
    )
