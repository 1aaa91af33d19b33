"""Judging learning by held-out behaviour: ``lorafleet-local eval`` (``make eval``).

For each goal suite (``examples/eval``) and each configuration, an adapter of its own is trained on
the suite's training questions through a trainer's HTTP API, as a client would: every step samples
fresh rollouts of the adapter's current version (or, for the configuration of earlier releases,
reuses greedy rollouts taken once), adds the feedback, and posts one distill step. Before training
and every ``every`` steps the adapter answers the suite's held-out questions greedily, and the
answers are judged by ``verifiers``: the share that follow the goal, the share that keep their
fact, the share that are degenerate; the mean log-probability of general reference answers
(``capability.json``) tells whether general capability was kept. The distill loss is reported,
never used as the verdict: it falls 10x in runs whose answers do not move.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_local import checkout, polling, processes, verifiers
from lorafleet_local.fleet import call_trainer

SUITES = checkout.EXAMPLES / "eval"
# The LoRA of the example adapters (examples/adapters.yaml): every linear layer, rank 16.
LORA = {
    "rank": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# The goal is met when this share of held-out answers follows it (issue 24's bar), with the facts
# kept at FACT_BAR of what the base model keeps and at most DEGENERATE_BAR degenerate answers.
FOLLOW_BAR = 0.7
FACT_BAR = 0.8
DEGENERATE_BAR = 0.1


class EvalError(RuntimeError):
    """A trainer call of the evaluation was refused; the message names the call and the answer."""


@dataclass(frozen=True)
class Config:
    """How an adapter learns: training settings (the trainer's defaults where absent) and rollouts."""

    name: str
    training: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True  # fresh rollouts of the current version every step, else greedy ones taken once
    n: int = 2  # rollouts per training question and step
    temperature: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Config:
        """``NAME`` (a named configuration) or ``NAME:key=value,...`` (its changes), e.g.
        ``defaults:alpha=0.5,n=4``; keys other than fresh, n and temperature are training fields."""
        name, _, changes = text.partition(":")
        base = NAMED.get(name, cls(name))
        training, own = (
            dict(base.training),
            {"fresh": base.fresh, "n": base.n, "temperature": base.temperature},
        )
        for item in filter(None, changes.split(",")):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} in {text!r}: expected key=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            (own if key in own else training)[key] = value
        return cls(text, training, bool(own["fresh"]), int(own["n"]), float(own["temperature"]))


NAMED = {
    # The shipped defaults: every training field from the CRD, fresh sampled rollouts.
    "defaults": Config("defaults"),
    # What earlier releases did: the feedback appended under a header, the alpha-0.5 JSD, and four
    # greedy rollouts taken once and reused for every step (the demo's goals used lr 5e-4..1e-3).
    "previous": Config(
        "previous",
        {"alpha": 0.5, "teacher_template": "appended", "learning_rate": 5e-4},
        fresh=False,
        n=1,
        temperature=0.0,
    ),
}


@dataclass
class Checkpoint:
    step: int
    follow: float
    facts: float
    degenerate: float
    capability: float  # mean log-probability of the capability reference answers
    loss: float | None  # the distill loss of the step just taken
    answers: list[str]


@dataclass
class GoalResult:
    suite: str
    kind: str
    config: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # the distill call, as the client waits for it
    rollout_s: list[float] = field(default_factory=list)  # the rollouts call of each step

    @property
    def first(self) -> Checkpoint:
        return self.checkpoints[0]

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]

    def achieved_at(self) -> int | None:
        """The first checkpoint's step where the goal is met on held-out questions, facts kept."""
        base_facts = self.first.facts
        for c in self.checkpoints:
            if achieved(c, base_facts):
                return c.step
        return None


def achieved(c: Checkpoint, base_facts: float) -> bool:
    return c.follow >= FOLLOW_BAR and c.facts >= FACT_BAR * base_facts and c.degenerate <= DEGENERATE_BAR


class Client:
    """The trainer routes the evaluation uses, for one adapter."""

    def __init__(self, base_url: str, namespace: str, token: str = "") -> None:
        self.base_url, self.namespace, self.token = base_url.rstrip("/"), namespace, token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        code, answer = call_trainer(method, self.base_url + path, body, self.token, timeout=1800)
        if code >= 300:
            raise EvalError(f"{method} {path}: {code} {answer}")
        return answer

    def route(self, adapter: str) -> str:
        return f"/v1/adapters/{self.namespace}/{adapter}"


def _judge(suite: verifiers.Suite, answers: Sequence[str]) -> tuple[float, float, float]:
    n = len(answers)
    follow = sum(verifiers.follows(a, suite.verifier) for a in answers) / n
    facts = sum(verifiers.keeps_fact(a, h.fact) for a, h in zip(answers, suite.held_out, strict=True)) / n
    broken = sum(verifiers.degenerate(a) is not None for a in answers) / n
    return follow, facts, broken


def checkpoint(
    client: Client,
    adapter: str,
    suite: verifiers.Suite,
    capability: Sequence[verifiers.Reference],
    step: int,
    loss: float | None,
) -> Checkpoint:
    route = client.route(adapter)
    body = {
        "prompts": [{"messages": suite.messages(h.question)} for h in suite.held_out],
        "temperature": 0.0,
        "max_tokens": suite.max_tokens,
    }
    answers = [r["text"] for r in client.call("POST", route + "/rollouts", body)["rollouts"]]
    scores = [
        client.call(
            "POST",
            route + "/score",
            {"messages": [{"role": "user", "content": r.question}], "response": r.answer},
        )["mean_logprob"]
        for r in capability
    ]
    follow, facts, broken = _judge(suite, answers)
    return Checkpoint(step, follow, facts, broken, sum(scores) / len(scores), loss, answers)


def rollouts(
    client: Client, adapter: str, suite: verifiers.Suite, config: Config, seed: int
) -> list[dict[str, Any]]:
    body = {
        "prompts": [{"messages": suite.messages(q)} for q in suite.train],
        "n": config.n,
        "temperature": config.temperature,
        "max_tokens": suite.max_tokens,
        "seed": seed,
        "feedback": suite.feedback,
    }
    return [r["sample"] for r in client.call("POST", client.route(adapter) + "/rollouts", body)["rollouts"]]


def run_goal(
    client: Client,
    suite: verifiers.Suite,
    config: Config,
    capability: Sequence[verifiers.Reference],
    steps: int,
    every: int,
    seed: int = 0,
    on_checkpoint: Callable[[GoalResult], None] | None = None,
) -> GoalResult:
    """Train a fresh adapter on ``suite`` with ``config`` for ``steps``, judging every ``every``."""
    adapter = f"{config.name.partition(':')[0]}-{suite.name}"[:63].strip("-")
    route = client.route(adapter)
    client.call("DELETE", route)  # a fresh adapter: an earlier run's state would not compare
    client.call("PUT", route, {"lora": LORA, "epoch": 1, "training": config.training or None})
    result = GoalResult(suite.name, suite.kind, config.name)
    result.checkpoints.append(checkpoint(client, adapter, suite, capability, 0, None))
    if on_checkpoint:
        on_checkpoint(result)
    samples: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        if config.fresh or not samples:
            samples = rollouts(client, adapter, suite, config, seed * 100_003 + step)
        t1 = time.perf_counter()
        answer = client.call("POST", route + "/distill", {"samples": samples})
        t2 = time.perf_counter()
        if config.fresh or step == 1:
            result.rollout_s.append(t1 - t0)
        result.step_s.append(t2 - t1)
        if step % every == 0 or step == steps:
            loss = float(answer["metrics"]["distill_loss"])
            result.checkpoints.append(checkpoint(client, adapter, suite, capability, step, loss))
            if on_checkpoint:
                on_checkpoint(result)
    client.call("DELETE", route)
    return result


# ---- reporting --------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:3.0f}%"


def table(results: Sequence[GoalResult]) -> str:
    """Per goal and configuration: before -> after for each figure, and where the goal was met."""
    lines = [
        f"{'goal':10s} {'kind':9s} {'config':28s} {'follow':>11s} {'facts':>11s} {'degen.':>11s}"
        f" {'capability':>15s} {'loss':>15s}  achieved"
    ]
    for r in results:
        a, b = r.first, r.last
        losses = [c.loss for c in r.checkpoints if c.loss is not None]
        loss = f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"
        at = r.achieved_at()
        lines.append(
            f"{r.suite:10s} {r.kind:9s} {r.config[:28]:28s} {pct(a.follow)}->{pct(b.follow)}"
            f" {pct(a.facts)}->{pct(b.facts)} {pct(a.degenerate)}->{pct(b.degenerate)}"
            f" {a.capability:6.2f}->{b.capability:6.2f} {loss:>15s}  {'no' if at is None else f'step {at}'}"
        )
    return "\n".join(lines)


def summary(results: Sequence[GoalResult]) -> str:
    """One line per configuration: goals met, and what the figures say beside the loss."""
    out = []
    for config in dict.fromkeys(r.config for r in results):
        mine = [r for r in results if r.config == config]
        met = [r for r in mine if r.achieved_at() is not None]
        fell = [r for r in mine if _loss_fell(r) and r.last.follow <= r.first.follow]
        line = f"{config}: goal met on held-out questions for {len(met)} of {len(mine)} goals"
        if met:
            line += f" ({', '.join(r.suite for r in met)})"
        if fell:
            line += (
                f"; the distill loss fell 5x or more while the follow-rate did not rise for "
                f"{', '.join(r.suite for r in fell)}: a falling loss is not learning"
            )
        out.append(line)
    return "\n".join(out)


def _loss_fell(r: GoalResult) -> bool:
    losses = [c.loss for c in r.checkpoints if c.loss is not None and c.loss > 0]
    return len(losses) >= 2 and losses[0] / losses[-1] >= 5


def timings(results: Sequence[GoalResult]) -> str:
    lines = []
    for config in dict.fromkeys(r.config for r in results):
        mine = [r for r in results if r.config == config]
        steps = [s for r in mine for s in r.step_s]
        rolls = [s for r in mine for s in r.rollout_s]
        if steps:
            lines.append(
                f"{config}: distill step {_mean(steps):.2f} s, rollouts {_mean(rolls):.2f} s per step"
                f" (mean over {len(steps)} steps)"
            )
    return "\n".join(lines)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def to_json(results: Sequence[GoalResult]) -> dict[str, Any]:
    return {
        "bars": {"follow": FOLLOW_BAR, "facts_of_base": FACT_BAR, "degenerate": DEGENERATE_BAR},
        "results": [{**asdict(r), "achieved_at": r.achieved_at()} for r in results],
    }


def plot(results: Sequence[GoalResult], path: Path) -> None:
    """Follow-rate and fact retention against steps, one panel per goal, a line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(r.suite for r in results))
    cols = min(3, len(suites))
    rows = math.ceil(len(suites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, suite in zip(axes.flat, suites, strict=False):
        for i, r in enumerate(x for x in results if x.suite == suite):
            steps = [c.step for c in r.checkpoints]
            colour = f"C{i}"
            ax.plot(steps, [c.follow for c in r.checkpoints], "-o", color=colour, label=f"{r.config} follow")
            ax.plot(steps, [c.facts for c in r.checkpoints], "--", color=colour, label=f"{r.config} facts")
        ax.axhline(FOLLOW_BAR, color="grey", lw=0.6)
        ax.set_title(f"{suite} ({next(x.kind for x in results if x.suite == suite)})")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("steps")
    for ax in list(axes.flat)[len(suites) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load(names: Sequence[str] | None = None) -> tuple[list[verifiers.Suite], tuple[verifiers.Reference, ...]]:
    suites = verifiers.load_all(SUITES)
    if names:
        unknown = set(names) - {s.name for s in suites}
        if unknown:
            raise ValueError(f"no goal suite named {sorted(unknown)} in {SUITES}")
        suites = [s for s in suites if s.name in names]
    return suites, verifiers.load_capability(SUITES / verifiers.CAPABILITY_FILE)


def evaluate(
    client: Client,
    configs: Sequence[Config],
    suites: Sequence[verifiers.Suite],
    capability: Sequence[verifiers.Reference],
    steps: int,
    every: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[GoalResult]:
    """Every suite under every configuration, one after another (the same seeds for each)."""
    results = []

    def show(r: GoalResult) -> None:
        c = r.last
        loss = f"loss {c.loss:.4f}" if c.loss is not None else "before training"
        log(
            f"  {r.suite:10s} {r.config[:28]:28s} step {c.step:3d}  follow {pct(c.follow)}"
            f"  facts {pct(c.facts)}  degenerate {pct(c.degenerate)}  capability {c.capability:6.2f}"
            f"  {loss}  | {c.answers[0][:60]!r}"
        )

    for suite in suites:
        for config in configs:
            results.append(run_goal(client, suite, config, capability, steps, every, seed, show))
    return results


def report(results: Sequence[GoalResult], out: Path | None, log: Callable[[str], None] = print) -> None:
    log("\n" + table(results))
    log("\n" + summary(results))
    log(timings(results))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(to_json(results), indent=1))
        plot(results, out / "eval.png")
        log(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")


def named(configs: Mapping[str, Config] = NAMED) -> str:
    def one(c: Config) -> str:
        return (
            f"{c.name} ({'fresh' if c.fresh else 'reused greedy'} rollouts, {c.training or 'CRD defaults'})"
        )

    return ", ".join(one(c) for c in configs.values())


def start_trainer(workdir: Path, model: str) -> tuple[processes.Child, str]:
    """A trainer of this checkout's virtualenv on a free loopback port, serving ``model``."""
    port = processes.free_port()
    script = Path(sys.executable).parent / "lorafleet-trainer"
    argv = [str(script), "serve", "--base-model", model, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--storage", str(workdir / "adapters"), "--device", "cpu", "--max-generate-tokens", "256"]
    child = processes.Child("trainer", argv, workdir / "trainer.log")
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return call_trainer("GET", url + "/readyz", timeout=5)[0] == 200
        except OSError:
            return False

    polling.eventually("the trainer to load its model", ready, timeout=600, interval=1.0, child=child)
    return child, url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet-local eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin:smollm2", help="the base model (%(default)s)")
    parser.add_argument("--trainer", help="a running trainer's base URL (default: start one here)")
    parser.add_argument("--token", default="", help="that trainer's bearer token")
    parser.add_argument("--namespace", default="eval", help="the adapters' namespace on the trainer")
    parser.add_argument("--goals", nargs="*", help="goal suites to run (default: every one in examples/eval)")
    parser.add_argument(
        "--config", default="defaults", help=f"a configuration: {named()}; or NAME:key=value,..."
    )
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two configurations side by side")
    parser.add_argument("--steps", type=int, default=20, help="steps per goal (%(default)s)")
    parser.add_argument("--every", type=int, default=5, help="judge every N steps (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the rollouts (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("eval-results"), help="JSON and PNG go here")


def run(args: argparse.Namespace) -> int:
    try:
        configs = [Config.parse(c) for c in (args.compare or [args.config])]
        suites, capability = load(args.goals)
    except ValueError as exc:
        print(f"lorafleet-local eval: {exc}", file=sys.stderr)
        return 2
    child = None
    url = args.trainer
    if url is None:
        workdir = Path(tempfile.mkdtemp(prefix="lorafleet-eval-"))
        print(f"starting a trainer for {args.model} (log: {workdir / 'trainer.log'})", flush=True)
        child, url = start_trainer(workdir, args.model)
    try:
        client = Client(url, args.namespace, args.token)
        print(
            f"{len(suites)} goals x {len(configs)} configurations, {args.steps} steps,"
            f" judged every {args.every}"
        )
        results = evaluate(client, configs, suites, capability, args.steps, args.every, args.seed,
                           lambda line: print(line, flush=True))  # fmt: skip
        report(results, args.out)
    finally:
        if child is not None:
            child.stop()
    return 0
