"""Benchmark: a step's samples as padded batches against one forward per sample.

Trains one adapter per model for S steps of B samples each, whose prompts and responses have
different lengths (so padded rows really are padded), twice over the same engine and samples: with
a token budget of 1 (every sample its own forward: the per-sample path) and with the shipped budget
(the step's samples in one padded batch per forward). Both runs alternate ``--rounds`` times so a
busy moment on a shared host does not land on one side only. It prints steps/s, response tokens/s
and the speed-up per model, and the largest difference of the two runs' losses (the same math).

    python -m lorafleet_trainer.bench_batching [--models builtin:small,builtin:smollm2] [--steps 6]
        [--samples 4] [--rounds 2] [--threads N] [--device cpu|cuda|auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lorafleet_trainer import hostalloc

PROMPT_TOKENS = (48, 64)  # each sample's prompt and response lengths are drawn from these ranges
RESPONSE_TOKENS = (24, 32)


def samples(vocab: int, steps: int, per_step: int, seed: int) -> list[list[Any]]:
    from lorafleet_trainer.learning.samples import DistillSample

    rng = random.Random(seed)
    out = []
    for step in range(steps):
        batch = []
        for i in range(per_step):
            prompt = [rng.randrange(3, min(vocab, 20000)) for _ in range(rng.randint(*PROMPT_TOKENS))]
            response = [rng.randrange(3, min(vocab, 20000)) for _ in range(rng.randint(*RESPONSE_TOKENS))]
            batch.append(
                DistillSample.from_dict(
                    {
                        "prompt": f"question {step}.{i}",
                        "response": f"answer {step}.{i}",
                        "feedback": "Answer in one short sentence.",
                        "response_logprobs": [-rng.uniform(0.5, 3.0) for _ in response],
                        "prompt_token_ids": prompt,
                        "response_token_ids": response,
                    }
                )
            )
        out.append(batch)
    return out


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
    from lorafleet_trainer.ids import AdapterId
    from lorafleet_trainer.learning.configs import LoraSpec
    from lorafleet_trainer.settings import DEFAULT_STEP_TOKEN_BUDGET

    lora = LoraSpec(rank=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    budgets = {"per-sample": 1, "batched": DEFAULT_STEP_TOKEN_BUDGET}
    times: dict[str, list[float]] = {name: [] for name in budgets}
    losses: dict[str, list[float]] = {name: [] for name in budgets}
    tokens = 0
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-batching-") as tmp:
        engines = {
            name: TrainerEngine(
                EngineConfig(
                    storage_root=Path(tmp) / name,
                    base_model=model,
                    cache_capacity_bytes=1 << 32,
                    device=args.device,
                    model_cache_dir=args.model_cache,
                    step_token_budget=budget,
                )
            )
            for name, budget in budgets.items()
        }
        for engine in engines.values():
            engine.load()
        steps = samples(engines["batched"].vocab_size, args.steps + 1, args.samples, seed=0)
        tokens = sum(len(s.response_token_ids) for batch in steps[1:] for s in batch)
        for round_ in range(args.rounds):
            order = list(budgets) if round_ % 2 == 0 else list(reversed(budgets))
            for name in order:
                engine = engines[name]
                adapter = AdapterId("bench", f"round-{round_}")
                engine.init_adapter(adapter, lora, 1)
                engine.distill(adapter, steps[0])  # warm-up: allocator, first restore
                started = time.perf_counter()
                for batch in steps[1:]:
                    losses[name].append(engine.distill(adapter, batch).metrics["total_loss"])
                times[name].append(time.perf_counter() - started)
    row: dict[str, Any] = {"model": model, "steps": args.steps, "samples_per_step": args.samples}
    for name in budgets:
        seconds = statistics.median(times[name])
        row[f"{name}_steps_per_s"] = args.steps / seconds
        row[f"{name}_tokens_per_s"] = tokens / seconds
    row["speedup"] = row["batched_steps_per_s"] / row["per-sample_steps_per_s"]
    row["max_loss_difference"] = max(
        abs(a - b) for a, b in zip(losses["batched"], losses["per-sample"], strict=True)
    )
    return row


def parse_with_common(parser: argparse.ArgumentParser, json_help: str) -> argparse.Namespace:
    """Adds the options every step benchmark takes (threads, device, model cache, JSON output),
    parses, and applies ``--threads`` before any model is built."""
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model-cache", type=Path, help="where builtin models are generated")
    parser.add_argument("--json", type=Path, help=json_help)
    args = parser.parse_args()
    hostalloc.tune()  # as the trainer process does (cli)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="builtin:small,builtin:smollm2")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--samples", type=int, default=4, help="samples per step")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side")
    args = parse_with_common(parser, "write the rows as a JSON list here")
    rows = []
    print(
        f"{'model':<18} {'per-sample steps/s':>18} {'batched steps/s':>16}"
        f" {'tokens/s (per-sample -> batched)':>34} {'speed-up':>9} {'max |loss diff|':>16}"
    )
    for model in args.models.split(","):
        row = run_model(model, args)
        rows.append(row)
        print(
            f"{model:<18} {row['per-sample_steps_per_s']:>18.3f} {row['batched_steps_per_s']:>16.3f}"
            f" {row['per-sample_tokens_per_s']:>16.1f} -> {row['batched_tokens_per_s']:<15.1f}"
            f" {row['speedup']:>8.2f}x {row['max_loss_difference']:>16.2e}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
