"""Feedback goals (examples/goals/<adapter>.json) and running one through the trainer's HTTP API.

A goal is what a user wants an adapter to learn, said the way users say it (``feedback``), with the
questions it trains on, a held-out question it never trains on, and how to tell from two answers
that the second moved towards the goal (``check``). Running it is what a client of LoraFleet does:
ask the adapter (``generate``) for the held-out answer before training and for a rollout of each
question, add the feedback to each rollout, post the batch to ``distill`` ``steps`` times, then ask
the held-out question again. Greedy decoding throughout, so a run is deterministic.

The demo runs each example adapter's goal; `python -m lorafleet_local.goals URL GOAL.json` runs one
against any trainer (the adapter must exist there): URL is the adapter's route, or the trainer's
base URL as `status.endpoint` gives it with `--namespace` (the adapter's name is the goal's).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_local import checkout
from lorafleet_local.fleet import call_trainer

GOALS = checkout.EXAMPLES / "goals"
WORD = re.compile(r"[a-zàâçéèêëîïôûùüÿœ']+")

# (method, url, JSON body or None) -> (status code, decoded JSON)
Call = Callable[[str, str, Any], tuple[int, Any]]


class GoalError(RuntimeError):
    """A trainer call of a goal run was refused; the message names the call and the answer."""


@dataclass(frozen=True)
class Goal:
    adapter: str
    goal: str
    feedback: str
    questions: tuple[str, ...]
    held_out: str
    check: dict[str, Any]
    max_tokens: int
    steps: int
    training: dict[str, Any]
    system_prompt: str = ""

    @classmethod
    def load(cls, path: Path) -> Goal:
        data = json.loads(path.read_text())
        return cls(
            adapter=data["adapter"],
            goal=data["goal"],
            feedback=data["feedback"],
            questions=tuple(data["questions"]),
            held_out=data["held_out"],
            check=dict(data["check"]),
            max_tokens=int(data["max_tokens"]),
            steps=int(data["steps"]),
            training=dict(data["training"]),
            system_prompt=data.get("system_prompt", ""),
        )

    @classmethod
    def of(cls, adapter: str) -> Goal:
        return cls.load(GOALS / f"{adapter}.json")

    def messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": question}]

    def measure(self) -> str:
        """What ``score`` counts, in words."""
        if "marker_words" in self.check:
            return "share of goal words"
        return f"words (goal: <= {self.check['max_words']})"

    def score(self, answer: str) -> float:
        """The check's figure for one answer: the share of marker words, or the number of words."""
        words = WORD.findall(answer.lower())
        if "marker_words" in self.check:
            markers = {w.lower() for w in self.check["marker_words"]}
            return sum(w in markers for w in words) / max(1, len(words))
        return float(len(words))

    def moved(self, before: str, after: str) -> bool:
        """Whether the answer after training is closer to the goal than the one before."""
        if "marker_words" in self.check:
            return self.score(after) > self.score(before)
        return self.score(after) < self.score(before)


@dataclass
class GoalRun:
    goal: Goal
    samples: list[dict[str, Any]] = field(default_factory=list)  # the rollouts, feedback added
    before: str = ""
    after: str = ""
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    version: int = 0
    served: str = ""  # an inference server's answer to the held-out question at ``version``

    @property
    def moved(self) -> bool:
        return self.goal.moved(self.before, self.after)


def _ask(call: Call, url: str, goal: Goal, question: str) -> dict[str, Any]:
    body = {"messages": goal.messages(question), "max_tokens": goal.max_tokens}
    code, answer = call("POST", url + "/generate", body)
    if code != 200:
        raise GoalError(f"generate {goal.adapter}: {code} {answer}")
    return dict(answer)


def before(call: Call, url: str, goal: Goal) -> GoalRun:
    """The held-out answer before training, and the batch of rollouts with the feedback added."""
    run = GoalRun(goal, before=_ask(call, url, goal, goal.held_out)["text"])
    run.samples = [
        {**_ask(call, url, goal, question)["sample"], "feedback": goal.feedback}
        for question in goal.questions
    ]
    return run


def step(call: Call, url: str, run: GoalRun) -> dict[str, Any]:
    """One distill step on the run's batch; its loss and time are kept in ``run``."""
    body = {"samples": run.samples, "training": run.goal.training}
    code, answer = call("POST", url + "/distill", body)
    if code != 200:
        raise GoalError(f"distill {run.goal.adapter}: {code} {answer}")
    run.losses.append(float(answer["metrics"]["distill_loss"]))
    run.step_ms.append(float(answer["timing_ms"]["total"]))
    run.version = int(answer["version"])
    return dict(answer)


def after(call: Call, url: str, run: GoalRun) -> GoalRun:
    run.after = _ask(call, url, run.goal, run.goal.held_out)["text"]
    return run


def run_goal(call: Call, url: str, goal: Goal, on_step: Callable[[GoalRun], None] | None = None) -> GoalRun:
    """The whole goal against the adapter at ``url`` (…/v1/adapters/<ns>/<name>)."""
    run = before(call, url, goal)
    for _ in range(goal.steps):
        step(call, url, run)
        if on_step is not None:
            on_step(run)
    return after(call, url, run)


def adapter_route(url: str, namespace: str | None, adapter: str) -> str:
    """The adapter's route from its route or from a trainer's base URL and the namespace."""
    url = url.rstrip("/")
    if "/v1/adapters/" in url:
        return url
    if not namespace:
        raise ValueError(f"{url} is a trainer's base URL: give --namespace, or the adapter's route")
    return f"{url}/v1/adapters/{namespace}/{adapter}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafleet_local.goals", description=__doc__)
    parser.add_argument(
        "url", help="the adapter's route (http://HOST:8080/v1/adapters/NS/NAME) or status.endpoint"
    )
    parser.add_argument("--namespace", help="the adapter's namespace, when URL is status.endpoint")
    parser.add_argument("goal", type=Path, help="a goal file, e.g. examples/goals/alice.json")
    parser.add_argument("--token", default="", help="the trainer's bearer token, if it asks for one")
    args = parser.parse_args(argv)

    def call(method: str, url: str, body: Any) -> tuple[int, Any]:
        return call_trainer(method, url, body, args.token, timeout=900)

    goal = Goal.load(args.goal)
    try:
        route = adapter_route(args.url, args.namespace, goal.adapter)
    except ValueError as exc:
        parser.error(str(exc))

    def show(run: GoalRun) -> None:
        print(
            f"step {len(run.losses):2d}  distill loss {run.losses[-1]:.4f}  {run.step_ms[-1]:7.0f} ms",
            flush=True,
        )

    print(f"{goal.adapter}: {goal.feedback}")
    run = run_goal(call, route, goal, show)
    print(f"before: {run.before!r}  ({goal.measure()} {goal.score(run.before):.2f})")
    print(f"after:  {run.after!r}  ({goal.measure()} {goal.score(run.after):.2f})")
    print("moved towards the goal" if run.moved else "did not move towards the goal")
    return 0 if run.moved else 1


if __name__ == "__main__":
    raise SystemExit(main())
