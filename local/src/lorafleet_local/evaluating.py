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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafleet_local import goals, polling, processes, verifiers
from lorafleet_local.fleet import call_trainer

# The LoRA of the example adapters (examples/adapters.yaml): every linear layer, rank 16.
LORA = {
    "rank": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
FOLLOW_BAR, FACT_BAR, DEGENERATE_BAR = goals.FOLLOW_BAR, goals.FACT_BAR, goals.DEGENERATE_BAR


@dataclass(frozen=True)
class Config:
    """How an adapter learns: training settings (the trainer's defaults where absent) and rollouts."""

    name: str
    training: dict[str, Any] = field(default_factory=dict)
    loop: goals.Loop = field(default_factory=goals.Loop)

    @classmethod
    def parse(cls, text: str) -> Config:
        """``NAME`` (a named configuration) or ``NAME:key=value,...`` (its changes), e.g.
        ``defaults:alpha=0.5,n=4``; keys other than fresh, n and temperature are training fields."""
        name, _, changes = text.partition(":")
        base = NAMED.get(name, cls(name))
        training, loop = dict(base.training), asdict(base.loop)
        for item in filter(None, changes.split(",")):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} in {text!r}: expected key=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            (loop if key in loop else training)[key] = value
        return cls(text, training, goals.Loop(**loop))


NAMED = {
    # The shipped defaults: every training field from the CRD, fresh sampled rollouts.
    "defaults": Config("defaults"),
    # What earlier releases did: the feedback appended under a header, the alpha-0.5 JSD, and
    # greedy rollouts taken once and reused for every step (the demo's goals used lr 5e-4..1e-3).
    "previous": Config(
        "previous",
        {"alpha": 0.5, "teacher_template": "appended", "learning_rate": 5e-4},
        goals.Loop(n=1, temperature=0.0, fresh=False),
    ),
}


@dataclass
class Result:
    config: str
    run: goals.GoalRun

    @property
    def suite(self) -> verifiers.Suite:
        return self.run.goal.suite


def run_goal(
    call: goals.Call,
    base_url: str,
    namespace: str,
    suite: verifiers.Suite,
    config: Config,
    capability: Sequence[verifiers.Reference],
    steps: int,
    every: int,
    seed: int = 0,
    on_step: Callable[[goals.GoalRun], None] | None = None,
) -> Result:
    """Train a fresh adapter on ``suite`` with ``config`` for ``steps``, judging every ``every``."""
    adapter = f"{config.name.partition(':')[0]}-{suite.name}"[:63].strip("-")
    url = f"{base_url.rstrip('/')}/v1/adapters/{namespace}/{adapter}"
    call("DELETE", url, None)  # a fresh adapter: an earlier run's state would not compare
    code, answer = call("PUT", url, {"lora": LORA, "epoch": 1, "training": config.training or None})
    if code != 201:
        raise goals.GoalError(f"init {adapter}: {code} {answer}")
    goal = goals.Goal(adapter, suite, steps, dict(config.training), config.loop)
    try:
        run = goals.run_goal(call, url, goal, on_step, every=every, seed=seed, capability=capability)
    finally:
        call("DELETE", url, None)
    return Result(config.name, run)


# ---- reporting --------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:3.0f}%"


def table(results: Sequence[Result]) -> str:
    """Per goal and configuration: before -> after for each figure, and where the goal was met."""
    lines = [
        f"{'goal':10s} {'kind':9s} {'config':30s} {'follow':>11s} {'facts':>11s} {'degen.':>11s}"
        f" {'capability':>15s} {'distill loss':>15s}  achieved"
    ]
    for r in results:
        a, b = r.run.before, r.run.after
        losses = r.run.losses
        loss = f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"
        at = r.run.achieved_at()
        lines.append(
            f"{r.suite.name:10s} {r.suite.kind:9s} {r.config[:30]:30s} {pct(a.follow)}->{pct(b.follow)}"
            f" {pct(a.facts)}->{pct(b.facts)} {pct(a.degenerate)}->{pct(b.degenerate)}"
            f" {a.capability or 0:6.2f}->{b.capability or 0:6.2f} {loss:>15s}"
            f"  {'no' if at is None else f'step {at}'}"
        )
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    """One line per configuration: goals met, and what the figures say beside the loss."""
    out = []
    for config in dict.fromkeys(r.config for r in results):
        mine = [r for r in results if r.config == config]
        met = [r.suite.name for r in mine if r.run.achieved_at() is not None]
        line = f"{config}: goal met on held-out questions for {len(met)} of {len(mine)} goals"
        line += f" ({', '.join(met)})" if met else ""
        fell = [r.suite.name for r in mine if _loss_fell(r) and r.run.after.follow <= r.run.before.follow]
        if fell:
            line += (
                f"; the distill loss fell 5x or more while the follow-rate did not rise for"
                f" {', '.join(fell)}: a falling loss is not learning"
            )
        broke = [r.suite.name for r in mine if r.run.after.degenerate > DEGENERATE_BAR]
        if broke:
            line += f"; degenerate answers above {pct(DEGENERATE_BAR).strip()} for {', '.join(broke)}"
        out.append(line)
    return "\n".join(out)


def _loss_fell(r: Result) -> bool:
    losses = [x for x in r.run.losses if x > 0]
    return len(losses) >= 2 and losses[0] / losses[-1] >= 5


def timings(results: Sequence[Result]) -> str:
    lines = []
    for config in dict.fromkeys(r.config for r in results):
        steps = [ms for r in results if r.config == config for ms in r.run.step_ms]
        rolls = [ms for r in results if r.config == config for ms in r.run.rollout_ms]
        if steps:
            lines.append(
                f"{config}: distill step {_mean(steps) / 1000:.2f} s, rollouts {_mean(rolls) / 1000:.2f} s"
                f" per step that sampled them (means over {len(steps)} steps)"
            )
    return "\n".join(lines)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def to_json(results: Sequence[Result]) -> dict[str, Any]:
    return {
        "bars": {"follow": FOLLOW_BAR, "facts_of_before": FACT_BAR, "degenerate": DEGENERATE_BAR},
        "results": [
            {
                "goal": r.suite.name,
                "kind": r.suite.kind,
                "config": r.config,
                "achieved_at": r.run.achieved_at(),
                "checkpoints": [asdict(c) for c in r.run.checkpoints],
                "losses": r.run.losses,
                "step_ms": r.run.step_ms,
                "rollout_ms": r.run.rollout_ms,
                "teacher_preview": r.run.preview,
            }
            for r in results
        ],
    }


def plot(results: Sequence[Result], path: Path) -> None:
    """Follow-rate and fact retention against steps, one panel per goal, a line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.suite.name for r in results))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        mine = [r for r in results if r.suite.name == name]
        for i, r in enumerate(mine):
            steps = [c.step for c in r.run.checkpoints]
            ax.plot(
                steps, [c.follow for c in r.run.checkpoints], "-o", color=f"C{i}", label=f"{r.config}: follow"
            )
            ax.plot(
                steps, [c.facts for c in r.run.checkpoints], "--", color=f"C{i}", label=f"{r.config}: facts"
            )
        ax.axhline(FOLLOW_BAR, color="grey", lw=0.6)
        ax.set_title(f"{name} ({mine[0].suite.kind})")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("steps")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load(names: Sequence[str] | None = None) -> tuple[list[verifiers.Suite], tuple[verifiers.Reference, ...]]:
    suites = verifiers.load_all(goals.SUITES)
    if names:
        unknown = set(names) - {s.name for s in suites}
        if unknown:
            raise ValueError(f"no goal suite named {sorted(unknown)} in {goals.SUITES}")
        suites = [s for s in suites if s.name in names]
    return suites, verifiers.load_capability(goals.SUITES / verifiers.CAPABILITY_FILE)


def evaluate(
    call: goals.Call,
    base_url: str,
    namespace: str,
    configs: Sequence[Config],
    suites: Sequence[verifiers.Suite],
    capability: Sequence[verifiers.Reference],
    steps: int,
    every: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Every suite under every configuration, one after another (the same seeds for each)."""
    results = []
    for suite in suites:
        for config in configs:
            shown = [0]

            def show(run: goals.GoalRun, config: Config = config, shown: list[int] = shown) -> None:
                for c in run.checkpoints[shown[0] :]:
                    loss = f"loss {run.losses[c.step - 1]:.4f}" if c.step else "before"
                    log(
                        f"  {run.goal.suite.name:10s} {config.name[:30]:30s} step {c.step:3d}"
                        f"  follow {pct(c.follow)}  facts {pct(c.facts)}  degenerate {pct(c.degenerate)}"
                        f"  capability {c.capability or 0:6.2f}  {loss:12s} | {c.answers[0][:60]!r}"
                    )
                shown[0] = len(run.checkpoints)

            result = run_goal(call, base_url, namespace, suite, config, capability, steps, every, seed, show)
            show(result.run)
            results.append(result)
    return results


def report(results: Sequence[Result], out: Path | None, log: Callable[[str], None] = print) -> None:
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
        rollouts = "fresh" if c.loop.fresh else "reused greedy"
        return f"{c.name} ({rollouts} rollouts, {c.training or 'CRD defaults'})"

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

        def call(method: str, target: str, body: Any) -> tuple[int, Any]:
            return call_trainer(method, target, body, args.token, timeout=1800)

        print(
            f"{len(suites)} goals x {len(configs)} configurations, {args.steps} steps,"
            f" judged every {args.every}",
            flush=True,
        )
        results = evaluate(call, url, args.namespace, configs, suites, capability, args.steps, args.every,
                           args.seed, lambda line: print(line, flush=True))  # fmt: skip
        report(results, args.out)
    finally:
        if child is not None:
            child.stop()
    return 0
