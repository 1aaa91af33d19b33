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

`python -m lorafleet_local.goals --gateway GATEWAY_URL NS/ADAPTER GOAL.json` runs the same loop
through the gateway only, as a production user would (``--token`` or $LORAFLEET_GATEWAY_TOKEN
for its bearer token): held-out answers are greedy chats, each step's rollouts are chats with
OpenAI's ``n`` and ONE CLaaS batch of feedback on them (the gateway makes one step of a batch's
items for one adapter; the count is read from its answer). Each step says which version answered
its chats and which the feedback committed, and notes an older version or other than one new
version. There is no teacher preview and no capability score: those are trainer routes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_local import checkout, gateway_client, verifiers
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
    gateway_steps: list[GatewayStep] = field(default_factory=list)  # through the gateway only

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
    scores = [
        _ok(call, "POST", url + "/score", {"messages": [{"role": "user", "content": r.question}],
            "response": r.answer}, f"score {goal.adapter}")["mean_logprob"]
        for r in capability
    ]  # fmt: skip
    return checkpoint(goal, step, int(answer["version"]), [r["text"] for r in answer["rollouts"]], scores)


def checkpoint(
    goal: Goal, step: int, version: int, answers: list[str], scores: Sequence[float] = ()
) -> Checkpoint:
    """The held-out ``answers`` at ``version`` judged by the suite's verifier, however they were asked."""
    suite, n = goal.suite, len(answers)
    return Checkpoint(
        step=step,
        version=version,
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


# ---- the same loop through the gateway ----------------------------------------------------------


@dataclass(frozen=True)
class GatewayStep:
    """One step through the gateway: the version that answered its chats, the latest version the
    client knew of before its feedback, and what the feedback did."""

    answered_by: int
    latest: bool  # the gateway said the chats' version was the latest it could serve
    before: int
    result: gateway_client.Stepped

    @property
    def new_versions(self) -> int:
        """Versions committed since ``before``: 1 for one step; more when the gateway made several
        steps of the batch, or another client trained the adapter meanwhile."""
        return self.result.version - self.before


def judge_chats(gateway: gateway_client.GatewayClient, goal: Goal, step: int) -> Checkpoint:
    """Held-out answers as a user gets them: one greedy chat per question; the checkpoint's version
    is the oldest that answered (the header of each chat)."""
    suite = goal.suite
    chats = [
        gateway.chat(suite.messages(h.question), max_tokens=suite.max_tokens, temperature=0.0)
        for h in suite.held_out
    ]
    return checkpoint(goal, step, min(c.version for c in chats), [c.texts[0] for c in chats])


def step_chats(gateway: gateway_client.GatewayClient, run: GoalRun, key: str, seed: int = 0) -> GatewayStep:
    """One step: the rollouts as chats (``n`` answers per training question), then ONE CLaaS batch
    of all of them with the feedback, keyed ``key``; kept in ``run``. Empty answers are left out:
    CLaaS refuses an empty response."""
    goal, loop, suite = run.goal, run.goal.loop, run.goal.suite
    answered_by, latest = run.version, True
    if loop.fresh or not run.samples:
        t0 = time.perf_counter()
        base = seed * 100_003 + 1000 * (len(run.losses) + 1)
        chats = [
            (q, gateway.chat(suite.messages(q), max_tokens=suite.max_tokens, n=loop.n if loop.fresh else 1,
                             temperature=loop.temperature if loop.fresh else 0.0, seed=base + 10 * i))
            for i, q in enumerate(suite.train)
        ]  # fmt: skip
        run.rollout_ms.append((time.perf_counter() - t0) * 1000.0)
        run.samples = [
            {"prompt": q, "response": text, "completion_id": cid}
            for q, c in chats
            for text, cid in zip(c.texts, c.completion_ids, strict=True)
            if text
        ]
        if not run.samples:
            raise GoalError(f"chat {gateway.model}: every rollout was empty: nothing to give feedback on")
        answered_by, latest = min(c.version for _, c in chats), all(c.latest for _, c in chats)
    t0 = time.perf_counter()
    result = gateway.feedback(run.samples, suite.feedback, key, goal.training)
    run.step_ms.append((time.perf_counter() - t0) * 1000.0)
    run.losses.append(result.loss)
    done = GatewayStep(answered_by, latest, run.version, result)
    run.gateway_steps.append(done)
    run.version = result.version
    return done


def run_goal_gateway(
    gateway: gateway_client.GatewayClient,
    goal: Goal,
    on_step: Callable[[GoalRun], None] | None = None,
    *,
    key: str | None = None,
    seed: int = 0,
) -> GoalRun:
    """The whole goal through the gateway only. No teacher preview (a trainer route the gateway does
    not offer) and no capability scores (the same). Step i's feedback carries the idempotency key
    ``<key>-<i>``: a rerun of the run with the same ``key`` replays its steps instead of repeating them."""
    key = key or uuid.uuid4().hex[:16]
    run = GoalRun(goal)
    run.checkpoints.append(judge_chats(gateway, goal, 0))
    run.version = run.before.version
    for index in range(1, goal.steps + 1):
        step_chats(gateway, run, f"goals-{key}-{index}", seed)
        if index == goal.steps:
            run.checkpoints.append(judge_chats(gateway, goal, index))
        if on_step is not None:
            on_step(run)
    return run


def gateway_step_line(run: GoalRun) -> str:
    """The last gateway step in a line, with what was unexpected said: chats answered by an older
    version than the latest, or a feedback that made other than one new version."""
    s = run.gateway_steps[-1]
    r = s.result
    line = (
        f"step {len(run.losses):2d}  rollouts answered by v{s.answered_by}  feedback"
        f" ({len(r.samples)} answers, {r.steps} step{'s' if r.steps != 1 else ''}) -> v{r.version}"
        f"  distill loss {r.loss:.4f}  {run.step_ms[-1]:7.0f} ms"
    )
    notes = []
    if s.answered_by < s.before:
        notes.append(
            f"the gateway answered with v{s.answered_by}, older than v{s.before} (no server served it yet)"
        )
    elif not s.latest:
        notes.append(f"the gateway said v{s.answered_by} was not the adapter's latest version")
    if r.replayed:
        notes.append("replayed: the gateway had taken this key's step already")
    elif s.new_versions != 1:
        notes.append(f"{s.new_versions} new versions, not 1 (steps of other clients, or one per item)")
    return line + "".join(f"\n  note: {n}" for n in notes)


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
        "url",
        help="the adapter's route (http://HOST:8080/v1/adapters/NS/NAME) or status.endpoint;"
        " with --gateway, the adapter as NAMESPACE/ADAPTER",
    )
    parser.add_argument("--namespace", help="the adapter's namespace, when URL is status.endpoint")
    parser.add_argument("goal", type=Path, help="a goal file, e.g. examples/goals/alice.json")
    parser.add_argument(
        "--token",
        default="",
        help=f"the trainer's bearer token, if it asks for one; with --gateway the gateway's"
        f" (default: ${gateway_client.TOKEN_ENV})",
    )
    parser.add_argument(
        "--gateway",
        metavar="GATEWAY_URL",
        help="run the loop through this gateway only: OpenAI chats and CLaaS feedback, no trainer route",
    )
    args = parser.parse_args(argv)
    goal = Goal.load(args.goal)
    if args.gateway:
        token = args.token or os.environ.get(gateway_client.TOKEN_ENV, "")
        try:
            gateway = gateway_client.GatewayClient(args.gateway, args.url, token)
        except ValueError as exc:
            parser.error(f"with --gateway, URL {exc}")
        try:
            return main_gateway(gateway, goal)
        except (GoalError, gateway_client.GatewayError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    def call(method: str, url: str, body: Any) -> tuple[int, Any]:
        return call_trainer(method, url, body, args.token, timeout=900)

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
    return verdict(run)


def verdict(run: GoalRun) -> int:
    """The behaviour before and after, and whether the goal was met: 0 if it was, else 1."""
    print(f"before (v{run.before.version}): {describe(run.before)}  e.g. {run.before.answers[0]!r}")
    print(f"after  (v{run.after.version}): {describe(run.after)}  e.g. {run.after.answers[0]!r}")
    print(
        "goal achieved on held-out questions" if run.achieved else "goal not achieved on held-out questions"
    )
    return 0 if run.achieved else 1


def main_gateway(gateway: gateway_client.GatewayClient, goal: Goal) -> int:
    """The goal run through ``gateway``, printed as it goes; the exit status of :func:`verdict`."""
    print(f"{gateway.model} through the gateway {gateway.url}: {goal.suite.feedback}")
    print("teacher preview: skipped (POST .../teacher is a trainer route; the gateway has none)")
    run = run_goal_gateway(gateway, goal, lambda r: print(gateway_step_line(r), flush=True))
    if run.after.version < run.version:
        print(f"note: the held-out chats after the last step were answered by v{run.after.version},"
              f" older than v{run.version}")  # fmt: skip
    return verdict(run)


if __name__ == "__main__":
    raise SystemExit(main())
