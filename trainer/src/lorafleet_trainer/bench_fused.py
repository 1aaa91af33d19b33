"""Benchmark: the steps of N adapters that arrive together, per-sample, batched and fused.

N adapters of one LoRA shape (``--concurrent``) each get a step of S samples (``--samples``) at the
same moment, ``--steps`` times per round. Three engines train the same adapters on the same
samples: ``per-sample`` (a token budget of 1: one forward per sample, one adapter after another),
``batched`` (each step's samples in one padded forward, one adapter after another) and ``fused``
(``distill_many``: every adapter's samples in one forward and backward, each row through its own
adapter's LoRA weights). The paths alternate round by round, so a busy moment on a shared host does
not land on one side only. It prints steps/s and response tokens/s per path, the speed-ups over
per-sample, the largest loss difference against per-sample (the same math), and each step's latency
from the moment the steps arrived to its answer (p50/p95) for batched and fused under ``sync`` and
``async`` durability. ``--rollouts MODEL`` adds sampling: 16 prompts x 48 new tokens decoded as one
batch against one prompt at a time (tokens/s).

    python -m lorafleet_trainer.bench_fused [--models builtin:small,builtin:smollm2] [--concurrent 8]
        [--samples 4] [--steps 1] [--rounds 2] [--durability sync,async] [--rollouts builtin:smollm2]
        [--threads N] [--device cpu|cuda|auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lorafleet_trainer.bench_batching import parse_with_common
from lorafleet_trainer.bench_batching import samples as make_samples

ROLLOUT_PROMPTS = 16
ROLLOUT_TOKENS = 48


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
    from lorafleet_trainer.ids import AdapterId
    from lorafleet_trainer.learning.configs import LoraSpec
    from lorafleet_trainer.results import StepRequest, StepResult
    from lorafleet_trainer.settings import DEFAULT_STEP_TOKEN_BUDGET

    lora = LoraSpec(rank=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    n, s = args.concurrent, args.samples
    modes = args.durability.split(",")
    # (path, durability) -> engine: per-sample only in sync (it is the baseline, not a latency row)
    runs = [("per-sample", "sync"), *((p, d) for d in modes for p in ("batched", "fused"))]
    adapters = [AdapterId("bench", f"adapter-{i}") for i in range(n)]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    latencies: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    losses: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-fused-") as tmp:
        engines = {
            run: TrainerEngine(
                EngineConfig(
                    storage_root=Path(tmp) / "-".join(run),
                    base_model=model,
                    cache_capacity_bytes=1 << 32,
                    device=args.device,
                    model_cache_dir=args.model_cache,
                    step_token_budget=1 if run[0] == "per-sample" else DEFAULT_STEP_TOKEN_BUDGET,
                    durability=run[1],
                    fuse_max_adapters=max(n, 1),
                    fuse_max_rows=max(n * s, 1),
                )
            )
            for run in runs
        }
        waves = args.rounds * args.steps
        vocab = 0
        for engine in engines.values():
            engine.load()
            vocab = engine.vocab_size
        steps = make_samples(vocab, (waves + 1) * n, s, seed=0)
        tokens = sum(len(x.response_token_ids) for batch in steps[n:] for x in batch) / waves  # per step wave
        for run, engine in engines.items():
            for adapter in adapters:
                engine.init_adapter(adapter, lora, 1)
            # Warm-up on a wave of full-size steps: every adapter's state cached, the lanes and the
            # allocator warm for the measured shapes.
            warm = [StepRequest(a, steps[i]) for i, a in enumerate(adapters)]
            if run[0] == "fused":
                engine.distill_many(warm)
            else:
                for r in warm:
                    engine.distill(r.adapter, r.samples)
        for round_ in range(args.rounds):
            order = runs if round_ % 2 == 0 else list(reversed(runs))
            for run in order:
                engine = engines[run]
                elapsed = 0.0
                for k in range(args.steps):
                    first = (1 + (round_ * args.steps + k)) * n
                    requests = [StepRequest(a, steps[first + i]) for i, a in enumerate(adapters)]
                    arrived = time.perf_counter()
                    if run[0] == "fused":
                        results = engine.distill_many(requests)
                        done = [time.perf_counter()] * n
                    else:
                        results, done = [], []
                        for r in requests:
                            results.append(engine.distill(r.adapter, r.samples))
                            done.append(time.perf_counter())
                    elapsed += done[-1] - arrived
                    latencies[run].extend(t - arrived for t in done)
                    for result in results:
                        if not isinstance(result, StepResult):
                            raise result
                        losses[run].append(result.metrics["total_loss"])
                times[run].append(elapsed)
        for engine in engines.values():
            engine.close(60.0)
    row: dict[str, Any] = {"model": model, "concurrent": n, "samples_per_step": s, "steps": args.steps}
    per_round = args.steps * n
    for run in runs:
        name = run[0] if run[1] == "sync" else "-".join(run)
        seconds = statistics.median(times[run])
        row[f"{name}_steps_per_s"] = per_round / seconds
        row[f"{name}_tokens_per_s"] = tokens * args.steps / seconds
        row[f"{name}_latency_p50_s"] = _percentile(latencies[run], 0.5)
        row[f"{name}_latency_p95_s"] = _percentile(latencies[run], 0.95)
        if run != ("per-sample", "sync"):
            row[f"{name}_max_loss_difference"] = max(
                abs(a - b) for a, b in zip(losses[run], losses[("per-sample", "sync")], strict=True)
            )
    for name in ("batched", "fused"):
        row[f"{name}_speedup"] = row[f"{name}_steps_per_s"] / row["per-sample_steps_per_s"]
    row["durability"] = modes
    return row


def run_rollouts(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """16 prompts x 48 new tokens (greedy) as one batch against one prompt at a time."""
    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
    from lorafleet_trainer.learning import sampling

    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-rollouts-") as tmp:
        engine = TrainerEngine(
            EngineConfig(
                storage_root=Path(tmp), base_model=model, device=args.device, model_cache_dir=args.model_cache
            )
        )
        engine.load()
        prompts = [
            sampling.Prompt(
                messages=(sampling.Message("user", f"Tell me a long story about the number {i}."),)
            )
            for i in range(ROLLOUT_PROMPTS)
        ]
        params = [sampling.SamplingParams(max_tokens=ROLLOUT_TOKENS)] * ROLLOUT_PROMPTS
        engine.rollouts(None, prompts[:2], params[:2])  # warm-up
        out: dict[str, list[float]] = {"one-at-a-time": [], "batched": []}
        produced = {"one-at-a-time": 0, "batched": 0}
        for round_ in range(args.rounds):
            for name in ("one-at-a-time", "batched") if round_ % 2 == 0 else ("batched", "one-at-a-time"):
                started = time.perf_counter()
                if name == "batched":
                    gens = engine.rollouts(None, prompts, params)
                else:
                    gens = [
                        g
                        for p, q in zip(prompts, params, strict=True)
                        for g in engine.rollouts(None, [p], [q])
                    ]
                seconds = time.perf_counter() - started
                produced[name] = sum(len(g.token_ids) for g in gens)
                out[name].append(produced[name] / seconds)
    row: dict[str, Any] = {"model": model, "prompts": ROLLOUT_PROMPTS, "max_tokens": ROLLOUT_TOKENS}
    for name, rates in out.items():
        row[f"{name}_tokens_per_s"] = statistics.median(rates)
        row[f"{name}_tokens"] = produced[name]
    row["speedup"] = row["batched_tokens_per_s"] / row["one-at-a-time_tokens_per_s"]
    return row


def _print_steps(row: dict[str, Any]) -> None:
    print(
        f"{row['model']}: {row['concurrent']} adapters x {row['samples_per_step']} samples, "
        f"{row['steps']} step(s) each per round"
    )
    for name in ("per-sample", "batched", "fused"):
        speed = f"{row[f'{name}_speedup']:.2f}x" if name != "per-sample" else "1.00x"
        diff = row.get(f"{name}_max_loss_difference")
        print(
            f"  {name:<11} {row[f'{name}_steps_per_s']:>8.3f} steps/s"
            f" {row[f'{name}_tokens_per_s']:>9.1f} tokens/s"
            f"  {speed:>6} vs per-sample" + (f"  max |loss diff| {diff:.2e}" if diff is not None else "")
        )
    for mode in row["durability"]:
        for name in ("batched", "fused"):
            key = name if mode == "sync" else f"{name}-{mode}"
            print(
                f"  latency {mode:<5} {name:<8} p50 {row[f'{key}_latency_p50_s']:>7.3f} s"
                f"  p95 {row[f'{key}_latency_p95_s']:>7.3f} s"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="builtin:small,builtin:smollm2")
    parser.add_argument("--concurrent", type=int, default=8, help="adapters whose steps arrive together")
    parser.add_argument("--samples", type=int, default=4, help="samples per step")
    parser.add_argument("--steps", type=int, default=1, help="measured steps per adapter per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path")
    parser.add_argument("--durability", default="sync,async", help="durability modes for the latency rows")
    parser.add_argument(
        "--rollouts", default="builtin:smollm2", help="model of the rollout figure ('' skips it)"
    )
    args = parse_with_common(parser, "write the rows as a JSON object here")
    rows = []
    for model in filter(None, args.models.split(",")):
        row = run_model(model, args)
        rows.append(row)
        _print_steps(row)
    rollouts = None
    if args.rollouts:
        rollouts = run_rollouts(args.rollouts, args)
        print(
            f"{rollouts['model']} rollouts, {ROLLOUT_PROMPTS} prompts x {ROLLOUT_TOKENS} tokens:"
            f" one at a time {rollouts['one-at-a-time_tokens_per_s']:.1f} tokens/s,"
            f" batched {rollouts['batched_tokens_per_s']:.1f} tokens/s, {rollouts['speedup']:.2f}x",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"steps": rows, "rollouts": rollouts}, indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
