"""Benchmark: what a persistent trainer with a CPU cache saves, measured against the alternatives.

Three modes train K adapters for S steps each, round-robin, on a builtin model:
``recreate`` loads a new trainer (and the base model) for every step, as trainers did before they
were persistent; ``persistent`` keeps the model but reads and writes each adapter's weights and
AdamW state from storage every step (cache capacity 0); ``cached`` is the engine as shipped
(durability ``sync``: a step answers once its version is durable); ``async`` is ``cached`` with
durability ``async`` (a step answers after its in-memory commit, a background writer persists), and
also reports its catch-up: from the last step's answer until every version is durable. Each
mode runs in its own process, so its peak RSS is its own. The first round-robin pass warms every
mode up (imports, allocator, first reads) and is not measured. With ``--rounds N`` every mode runs
N times in alternating order and its steps are pooled, so a busy moment on a shared host does not
land on one mode only.

``--dtype`` sets the base weights' dtype (LoRA state stays fp32); ``--modes`` runs a subset.
``--bandwidth`` (CUDA) times the adapter state's restore and snapshot copies against a plain
page-locked copy of the same number of bytes: both are one contiguous copy, so the ratio is the
engine's overhead and nothing else. The offloaded base upload is reported on its own.

    python -m lorafleet_trainer.bench [--quick] [--json PATH] [--device auto|cpu|cuda] [--bandwidth]
        [--dtype auto|bfloat16|float16|float32] [--modes cached,persistent]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("recreate", "persistent", "cached", "async")
KEYS = (
    "mode",
    "model",
    "step_ms_p50",
    "step_ms_p95",
    "restore_ms_p50",
    "compute_ms_p50",
    "snapshot_ms_p50",
    "persist_ms_p50",
    "storage_read_bytes_per_step",
    "peak_rss_bytes",
    "catch_up_ms_max",
)


@dataclass(frozen=True)
class Plan:
    model: str
    adapters: int
    steps: int
    prompt_tokens: int
    response_tokens: int
    batch: int
    rank: int
    dtype: str = "auto"


QUICK = Plan("builtin:tiny", adapters=2, steps=3, prompt_tokens=32, response_tokens=32, batch=2, rank=8)
FULL = Plan("builtin:small", adapters=3, steps=3, prompt_tokens=64, response_tokens=64, batch=2, rank=16)


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _samples(plan: Plan, seed: int) -> list[Any]:
    import random

    from lorafleet_trainer.learning.samples import DistillSample

    rng = random.Random(seed)
    return [
        DistillSample.from_dict(
            {
                "feedback": f"feedback {seed}.{i}: be more concise",
                "user_prompt": f"request {seed}.{i}",
                "system_prompt": "You are a helpful assistant.",
                "prompt_token_ids": [rng.randrange(256) for _ in range(plan.prompt_tokens)],
                "response_token_ids": [rng.randrange(256) for _ in range(plan.response_tokens)],
                "response_logprobs": [-rng.uniform(0.1, 4.0) for _ in range(plan.response_tokens)],
            }
        )
        for i in range(plan.batch)
    ]


def _engine(
    plan: Plan, root: Path, capacity: int, device: str, model_cache: Path | None, durability: str = "sync"
) -> Any:
    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine

    return TrainerEngine(
        EngineConfig(
            storage_root=root,
            base_model=plan.model,
            cache_capacity_bytes=capacity,
            device=device,
            dtype=plan.dtype,
            model_cache_dir=model_cache,
            durability=durability,
        )
    )


def run_mode(mode: str, plan: Plan, device: str, model_cache: Path | None, bandwidth: bool) -> dict[str, Any]:
    """Run one mode in this process; returns its row (plus bandwidth figures when asked)."""
    from lorafleet_trainer.ids import AdapterId
    from lorafleet_trainer.learning.configs import LoraSpec

    lora = LoraSpec(
        rank=plan.rank, alpha=2.0 * plan.rank, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    adapters = [AdapterId("bench", f"adapter-{i}") for i in range(plan.adapters)]
    capacity = 1 << 34 if mode in ("cached", "async") else 0
    rows: list[dict[str, float]] = []
    extra: dict[str, Any] = {}
    catch_up: float | None = None
    with tempfile.TemporaryDirectory(prefix=f"lorafleet-bench-{mode}-") as tmp:
        root = Path(tmp)
        engine = _engine(plan, root, capacity, device, model_cache, "async" if mode == "async" else "sync")
        engine.load()
        for a in adapters:
            engine.init_adapter(a, lora, 1)
        for step in range(plan.steps):
            for a in adapters:
                batch = _samples(plan, step * 1000 + adapters.index(a))
                t0 = time.perf_counter()
                if mode == "recreate":
                    engine = _engine(plan, root, 0, device, model_cache)
                    engine.load()
                result = engine.distill(a, batch)
                total = (time.perf_counter() - t0) * 1000.0
                if step > 0:  # the first pass is warm-up
                    rows.append({"step": total, "read": float(result.storage_read_bytes), **result.timing_ms})
                    rows[-1]["overhead"] = total - result.timing_ms["compute"]
                if mode == "async" and step == plan.steps - 1 and a == adapters[-1]:
                    # Steps stop: how long until every answered version is durable.
                    t1 = time.perf_counter()
                    assert engine.flush(600), "the writer did not catch up"
                    catch_up = (time.perf_counter() - t1) * 1000.0
                    assert all(engine.get_adapter(x).durable_version is None for x in adapters)
        if bandwidth and mode == "cached" and engine.device.type == "cuda":
            extra = measure_bandwidth(engine, adapters[0], rows)
        engine.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    return {"samples": rows, "peak_rss_bytes": rss, "bandwidth": extra, "catch_up_ms": catch_up}


def summarise(
    mode: str, model: str, rows: list[dict[str, float]], peak_rss: int, catch_up: list[float] | None = None
) -> dict[str, Any]:
    """One mode's row from its measured steps (pooled over rounds)."""
    row: dict[str, Any] = {
        "mode": mode,
        "model": model,
        "step_ms_p50": _percentile([r["step"] for r in rows], 50),
        "step_ms_p95": _percentile([r["step"] for r in rows], 95),
        "restore_ms_p50": _percentile([r["restore"] for r in rows], 50),
        "compute_ms_p50": _percentile([r["compute"] for r in rows], 50),
        "snapshot_ms_p50": _percentile([r["snapshot"] for r in rows], 50),
        "persist_ms_p50": _percentile([r["persist"] for r in rows], 50),
        "storage_read_bytes_per_step": statistics.fmean(r["read"] for r in rows),
        "peak_rss_bytes": peak_rss,
        "catch_up_ms_max": max(catch_up) if catch_up else None,
    }
    # Everything but the SDPO compute: the part a persistent, cached trainer exists to shrink. Shown
    # in the table (not the JSON) because on a shared CPU the compute itself is the noisy part.
    row["overhead_ms_p50"] = _percentile([r["overhead"] for r in rows], 50)
    return row


def measure_bandwidth(engine: Any, adapter: Any, rows: list[dict[str, float]]) -> dict[str, Any]:
    """Restore (host->device) and snapshot (device->host) copies of one adapter's state bundle,
    each timed alone, against a plain page-locked copy of the same bytes; plus the step's phases."""
    import torch

    from lorafleet_trainer.engine.bundles import StateBundle

    entry = engine.cache.peek(adapter)
    nbytes = entry.nbytes
    device_state = StateBundle.empty(entry.layout, engine.device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=engine.device)

    def timed(fn: Any) -> float:
        best = float("inf")
        for _ in range(10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    restore = timed(lambda: device_state.copy_from(entry, non_blocking=True))
    snapshot = timed(lambda: entry.flat.copy_(device_state.flat, non_blocking=True))
    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host.copy_(dev, non_blocking=True))
    gb = 1e-9 * nbytes
    return {
        "adapter_state_bytes": nbytes,
        "entry_pinned": bool(entry.flat.is_pinned()),
        "restore_h2d_gb_per_s": gb / restore,
        "plain_pinned_h2d_gb_per_s": gb / h2d,
        "snapshot_d2h_gb_per_s": gb / snapshot,
        "plain_pinned_d2h_gb_per_s": gb / d2h,
        "restore_phase_ms_p50": _percentile([r["restore"] for r in rows], 50),
        "snapshot_phase_ms_p50": _percentile([r["snapshot"] for r in rows], 50),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'mode':<11}{'step p50':>10}{'p95':>10}{'restore':>9}{'compute':>10}{'snapshot':>10}"
    head += f"{'persist':>9}{'non-compute':>13}{'read B/step':>13}{'peak RSS MiB':>14}{'(r+s)/step':>12}"
    lines = ["times in ms, p50 unless p95", head, "-" * len(head)]
    for r in rows:
        share = (r["restore_ms_p50"] + r["snapshot_ms_p50"]) / r["step_ms_p50"]
        lines.append(
            f"{r['mode']:<11}{r['step_ms_p50']:>10.1f}{r['step_ms_p95']:>10.1f}{r['restore_ms_p50']:>9.2f}"
            f"{r['compute_ms_p50']:>10.1f}{r['snapshot_ms_p50']:>10.2f}{r['persist_ms_p50']:>9.1f}"
            f"{r['overhead_ms_p50']:>13.1f}"
            f"{r['storage_read_bytes_per_step']:>13.0f}{r['peak_rss_bytes'] / 2**20:>14.0f}{share:>12.2%}"
        )
    return "\n".join(lines)


def _durability(sync: dict[str, Any], fast: dict[str, Any]) -> str:
    """sync (``cached``) against async: the step answer without the persist phase, and catch-up."""
    bound = sync["step_ms_p50"] - sync["persist_ms_p50"]
    return (
        f"durability: sync step p50 {sync['step_ms_p50']:.1f} p95 {sync['step_ms_p95']:.1f} ms "
        f"(persist p50 {sync['persist_ms_p50']:.1f}); async step p50 {fast['step_ms_p50']:.1f} "
        f"p95 {fast['step_ms_p95']:.1f} ms (hand-off p50 {fast['persist_ms_p50']:.2f}); sync minus "
        f"persist p50 {bound:.1f} ms: async {'at most' if fast['step_ms_p50'] <= bound else 'ABOVE'} it; "
        f"catch-up after the last step {fast['catch_up_ms_max']:.1f} ms max "
        f"({'within' if fast['catch_up_ms_max'] <= sync['step_ms_p50'] else 'ABOVE'} one sync step p50)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorafleet_trainer.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="builtin:tiny, few steps (under a minute on 2 cores)"
    )
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--bandwidth", action="store_true", help="also measure host<->device copy rates (CUDA)"
    )
    parser.add_argument("--model", help="override the plan's base model")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="base weights' dtype",
    )
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--adapters", type=int, help="K: adapters trained round-robin")
    parser.add_argument("--steps", type=int, help="S: steps per adapter (the first is warm-up)")
    parser.add_argument("--model-cache", type=Path, help="where builtin models are generated")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (on a shared host 1 avoids spinning against neighbours)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="run every mode this many times, order alternating (default 1 quick, 2 full)",
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        plan = Plan(**json.loads(args.plan))
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        out = run_mode(args.worker, plan, args.device, args.model_cache, args.bandwidth)
        print(json.dumps(out))
        return 0

    base = QUICK if args.quick else FULL
    plan = Plan(
        model=args.model or base.model,
        adapters=args.adapters or base.adapters,
        steps=max(2, args.steps or base.steps),
        prompt_tokens=base.prompt_tokens,
        response_tokens=base.response_tokens,
        batch=base.batch,
        rank=base.rank,
        dtype=args.dtype,
    )
    modes = tuple(m for m in MODES if args.modes is None or m in args.modes.split(","))
    if not modes:
        parser.error(f"--modes: choose from {','.join(MODES)}")
    args.rounds = max(1, args.rounds or (1 if args.quick else 2))
    # Generate the builtin model once, before timing anything.
    from lorafleet_trainer.models import models

    models.resolve(plan.model, args.model_cache)
    threads = args.threads or "torch default"
    print(f"plan: {plan}  rounds: {args.rounds}  device: {args.device}  threads: {threads}", flush=True)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    peak: dict[str, int] = dict.fromkeys(modes, 0)
    catch_up: dict[str, list[float]] = {m: [] for m in modes}
    bandwidth: dict[str, Any] = {}
    for rnd in range(args.rounds):
        # Alternate the order so no mode always runs when the host happens to be busiest.
        for mode in modes if rnd % 2 == 0 else tuple(reversed(modes)):
            cmd = [sys.executable, "-m", "lorafleet_trainer.bench", "--worker", mode, "--device", args.device]
            cmd += ["--plan", json.dumps(plan.__dict__)]
            if args.model_cache:
                cmd += ["--model-cache", str(args.model_cache)]
            if args.bandwidth:
                cmd.append("--bandwidth")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            samples[mode].extend(out["samples"])
            peak[mode] = max(peak[mode], out["peak_rss_bytes"])
            if out.get("catch_up_ms") is not None:
                catch_up[mode].append(out["catch_up_ms"])
            bandwidth.update(out["bandwidth"])
            print(f"  round {rnd + 1}: {mode} done in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = [summarise(m, plan.model, samples[m], peak[m], catch_up[m]) for m in modes]
    print(_table(rows))
    cached = next((r for r in rows if r["mode"] == "cached"), None)
    fast = next((r for r in rows if r["mode"] == "async"), None)
    if cached is not None and fast is not None:
        print(_durability(cached, fast))
    for other in ("persistent", "recreate"):
        r = next((x for x in rows if x["mode"] == other), None)
        if cached is None or r is None:
            continue
        print(
            f"cached vs {other}: step p50 {r['step_ms_p50'] / cached['step_ms_p50']:.2f}x, "
            f"non-compute p50 {r['overhead_ms_p50'] / cached['overhead_ms_p50']:.2f}x"
        )
    if bandwidth:
        print("bandwidth: " + ", ".join(f"{k}={v:.3g}" for k, v in bandwidth.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{k: r[k] for k in KEYS} for r in rows], indent=2) + "\n")
        if bandwidth:
            args.json.with_suffix(".bandwidth.json").write_text(json.dumps(bandwidth, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
