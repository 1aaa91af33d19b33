"""Step time of the trainer engine with and without a busy neighbour, at torch's default thread
count and at the count the trainer sizes for its CPU share.

torch's default is one thread per host core. When another process keeps one core busy, those threads
wait on each other at every parallel region; a count that fits the CPU this process may really use
does not. This prints the median step time of each of the four runs (a benchmark, not a test: the
figures depend on the machine and its load).

    python scripts/bench_threads.py [--model builtin:small] [--steps 6] [--sized N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lorafleet_trainer import bench, threads
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec


@contextlib.contextmanager
def neighbour(busy: bool) -> Iterator[None]:
    """A process spinning on one core for the duration (the noisy neighbour of a shared node)."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach full speed before the timed steps (not an ordering)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up)")
    parser.add_argument(
        "--sized", type=int, help="thread count for the sized runs (default: host CPUs minus the neighbour's)"
    )
    args = parser.parse_args()
    default = torch.get_num_threads()
    sized = args.sized or max(1, threads.schedulable_cpus() - 1)
    here = threads.plan(None, None)
    print(f"host CPUs: {os.cpu_count()}  torch default threads: {default}  sized: {sized}")
    print(f"threads.plan() in this process: {here.threads} (from {here.source})")
    plan = bench.Plan(args.model, adapters=1, steps=args.steps, prompt_tokens=64, response_tokens=64,
                      batch=2, rank=16)  # fmt: skip
    adapter = AdapterId("bench", "threads")
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-threads-") as tmp:
        engine = bench._engine(plan, Path(tmp), 1 << 32, "cpu", None)
        engine.load()
        engine.init_adapter(adapter, LoraSpec(rank=16, alpha=32.0, target_modules=("q_proj", "v_proj")), 1)
        engine.distill(adapter, bench._samples(plan, 0))  # warm-up: first-step allocations
        print(f"{'threads':>8} {'neighbour':>9} {'median s':>9} {'max s':>7}")
        for count in (default, sized):
            for busy in (False, True):
                torch.set_num_threads(count)
                with neighbour(busy):
                    times = []
                    for step in range(plan.steps):
                        t0 = time.perf_counter()
                        engine.distill(adapter, bench._samples(plan, step + 1))
                        times.append(time.perf_counter() - t0)
                label = "busy" if busy else "none"
                print(
                    f"{count:>8} {label:>9} {statistics.median(times):>9.3f} {max(times):>7.3f}", flush=True
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
