"""Feedback goals and the learning loop a client runs through the trainer's HTTP API.

A goal (``examples/goals/<adapter>.json``) names a goal suite of ``examples/eval`` (the feedback,
the questions it trains on, held-out questions with the fact each answer should keep, and a
verifier) and how many steps to take. Running it is what a client of LoraFleet does: ask the
teacher preview whether the teacher follows the feedback at all, judge the held-out answers, then
every step sample fresh rollouts of the adapter's current version (several per question, at
temperature 1, one batch), post them with the feedback as one distill step, and judge again at the
end. ``evaluating`` runs the same loop over many goals and configurations.

`python -m lorafleet_local.goals URL GOAL.json` runs one against any trainer (the adapter must exist
there): URL is the adapter's route, or the trainer's base URL as `status.endpoint` gives it with
`--namespace` (the adapter's name is the goal's).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_local import checkout, verifiers
from lorafleet_local.fleet import call_trainer

GOALS = checkout.EXAMPLES / "goals"
SUITES = checkout.EXAMPLES / "eval"
# The goal is met when this share of held-out answers follows it, with the facts kept at FACT_BAR
# of what the adapter kept before training and at most DEGENERATE_BAR of the answers degenerate.
FOLLOW_BAR = 0.7
FACT_BAR = 0.8
DEGENERATE_BAR = 0.1

# (method, url, JSON body or None) -> (status code, decoded JSON)
Call = Callable[[str, str, Any], tuple[int, Any]]


class GoalError(RuntimeError):
    """A trainer call of a goal run was refused; the message names the call and the answer."""


@dataclass(frozen=True)
class Loop:
    """How the client samples its rollouts each step."""

    n: int = 2  # rollouts per training question
    temperature: float = 1.0
    fresh: bool = True  # False: greedy rollouts taken once and reused (what earlier releases did)


@dataclass(frozen=True)
class Goal:
    adapter: str
    suite: verifiers.Suite
    steps: int
    training: dict[str, Any] = field(default_factory=dict)  # overrides of the adapter's settings
    loop: Loop = field(default_factory=Loop)

    @classmethod
    def load(cls, path: Path) -> Goal:
        data = json.loads(path.read_text())
        return cls(
            adapter=data["adapter"],
            suite=verifiers.Suite.load(SUITES / f"{data['suite']}.json"),
            steps=int(data["steps"]),
            training=dict(data.get("training", {})),
            loop=Loop(**data.get("loop", {})),
        )

    @classmethod
    def of(cls, adapter: str) -> Goal:
        return cls.load(GOALS / f"{adapter}.json")


@dataclass
class Checkpoint:
    """The held-out answers at one version, judged."""

    step: int
    version: int
    follow: float
    facts: float
    degenerate: float
    capability: float | None  # mean log-probability of general reference answers (None: not asked)
    answers: list[str]

    def met(self, before: Checkpoint) -> bool:
        """The goal is followed on held-out questions with the facts kept and no breakdown."""
        return (
            self.follow >= FOLLOW_BAR
            and self.facts >= FACT_BAR * before.facts
            and self.degenerate <= DEGENERATE_BAR
        )


@dataclass
class GoalRun:
    goal: Goal
    preview: dict[str, Any] = field(default_factory=dict)  # the teacher route's answer
    checkpoints: list[Checkpoint] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)  # each distill call as the client waits for it
    rollout_ms: list[float] = field(default_factory=list)  # each rollouts call
    samples: list[dict[str, Any]] = field(default_factory=list)  # the last step's rollouts
    version: int = 0
    served: str = ""  # an inference server's answer to the first held-out question at ``version``

    @property
    def before(self) -> Checkpoint:
        return self.checkpoints[0]

    @property
    def after(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def achieved(self) -> bool:
        return len(self.checkpoints) > 1 and self.after.met(self.before)

    def achieved_at(self) -> int | None:
        return next((c.step for c in self.checkpoints[1:] if c.met(self.before)), None)


def _ok(call: Call, method: str, url: str, body: Any, what: str) -> Any:
    code, answer = call(method, url, body)
    if code != 200:
        raise GoalError(f"{what}: {code} {answer}")
    return answer


def preview(call: Call, url: str, goal: Goal) -> dict[str, Any]:
    """What the teacher makes of the feedback on the first held-out question, beside the student."""
    suite = goal.suite
    body = {
        "messages": suite.messages(suite.held_out[0].question),
        "feedback": suite.feedback,
        "max_tokens": suite.max_tokens,
        "top": 3,
    }
    if goal.training:
        body["training"] = goal.training
    return dict(_ok(call, "POST", url + "/teacher", body, f"teacher {goal.adapter}"))


def judge(
    call: Call,
    url: str,
    goal: Goal,
    step: int,
    capability: Sequence[verifiers.Reference] = (),
) -> Checkpoint:
    """Greedy answers to every held-out question (one batch), judged by the suite's verifier."""
    suite = goal.suite
    body = {
        "prompts": [{"messages": suite.messages(h.question)} for h in suite.held_out],
        "temperature": 0.0,
        "max_tokens": suite.max_tokens,
    }
    answer = _ok(call, "POST", url + "/rollouts", body, f"rollouts {goal.adapter}")
    answers = [r["text"] for r in answer["rollouts"]]
    n = len(answers)
    scores = [
        _ok(call, "POST", url + "/score", {"messages": [{"role": "user", "content": r.question}],
            "response": r.answer}, f"score {goal.adapter}")["mean_logprob"]
        for r in capability
    ]  # fmt: skip
    return Checkpoint(
        step=step,
        version=int(answer["version"]),
        follow=sum(verifiers.follows(a, suite.verifier) for a in answers) / n,
        facts=sum(verifiers.keeps_fact(a, h.fact) for a, h in zip(answers, suite.held_out, strict=True)) / n,
        degenerate=sum(verifiers.degenerate(a) is not None for a in answers) / n,
        capability=sum(scores) / len(scores) if scores else None,
        answers=answers,
    )


def rollouts(call: Call, url: str, goal: Goal, seed: int) -> list[dict[str, Any]]:
    """The step's rollouts of the current version, each a distill sample with the feedback."""
    suite, loop = goal.suite, goal.loop
    body = {
        "prompts": [{"messages": suite.messages(q)} for q in suite.train],
        "n": loop.n if loop.fresh else 1,
        "temperature": loop.temperature if loop.fresh else 0.0,
        "max_tokens": suite.max_tokens,
        "seed": seed,
        "feedback": suite.feedback,
    }
    answer = _ok(call, "POST", url + "/rollouts", body, f"rollouts {goal.adapter}")
    return [r["sample"] for r in answer["rollouts"]]


def step(call: Call, url: str, run: GoalRun, seed: int = 0) -> dict[str, Any]:
    """One step: fresh rollouts (or the reused ones), then one distill call; kept in ``run``."""
    goal = run.goal
    if goal.loop.fresh or not run.samples:
        t0 = time.perf_counter()
        run.samples = rollouts(call, url, goal, seed * 100_003 + len(run.losses) + 1)
        run.rollout_ms.append((time.perf_counter() - t0) * 1000.0)
    body: dict[str, Any] = {"samples": run.samples}
    if goal.training:
        body["training"] = goal.training
    t0 = time.perf_counter()
    answer = dict(_ok(call, "POST", url + "/distill", body, f"distill {goal.adapter}"))
    run.step_ms.append((time.perf_counter() - t0) * 1000.0)
    run.losses.append(float(answer["metrics"]["distill_loss"]))
    run.version = int(answer["version"])
    return answer


def run_goal(
    call: Call,
    url: str,
    goal: Goal,
    on_step: Callable[[GoalRun], None] | None = None,
    *,
    every: int = 0,
    seed: int = 0,
    capability: Sequence[verifiers.Reference] = (),
) -> GoalRun:
    """The whole goal against the adapter at ``url`` (…/v1/adapters/<ns>/<name>): the teacher
    preview, the held-out answers before, ``goal.steps`` steps (judged again every ``every``, when
    given) and the held-out answers after."""
    run = GoalRun(goal, preview=preview(call, url, goal))
    run.checkpoints.append(judge(call, url, goal, 0, capability))
    for index in range(1, goal.steps + 1):
        step(call, url, run, seed)
        if index == goal.steps or (every and index % every == 0):
            run.checkpoints.append(judge(call, url, goal, index, capability))
        if on_step is not None:
            on_step(run)
    return run


def adapter_route(url: str, namespace: str | None, adapter: str) -> str:
    """The adapter's route from its route or from a trainer's base URL and the namespace."""
    url = url.rstrip("/")
    if "/v1/adapters/" in url:
        return url
    if not namespace:
        raise ValueError(f"{url} is a trainer's base URL: give --namespace, or the adapter's route")
    return f"{url}/v1/adapters/{namespace}/{adapter}"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def describe(c: Checkpoint) -> str:
    return f"follows {pct(c.follow)}, facts kept {pct(c.facts)}, degenerate {pct(c.degenerate)}"


def preview_lines(answer: dict[str, Any]) -> list[str]:
    """The teacher preview in a few lines: both answers, and the first position's top tokens."""
    lines = [
        f"teacher ({answer['template']} template) would answer: {answer['teacher_text'][:90]!r}",
        f"student answers:                       {answer['student_text'][:90]!r}",
    ]
    if answer["positions"]:
        first = answer["positions"][0]
        tops = ", ".join(f"{t['text']!r} {t['prob']:.2f}" for t in first["teacher"])
        lines.append(
            f"first token: teacher {tops}; the student gives {first['token']['text']!r}"
            f" {first['student_prob']:.4f}"
        )
    return lines


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

    print(f"{goal.adapter}: {goal.suite.feedback}")
    run = run_goal(call, route, goal, show)
    for line in preview_lines(run.preview):
        print(line)
    print(f"before: {describe(run.before)}  e.g. {run.before.answers[0]!r}")
    print(f"after:  {describe(run.after)}  e.g. {run.after.answers[0]!r}")
    print(
        "goal achieved on held-out questions" if run.achieved else "goal not achieved on held-out questions"
    )
    return 0 if run.achieved else 1


if __name__ == "__main__":
    raise SystemExit(main())
