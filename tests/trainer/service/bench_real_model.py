"""Figures for the real model over HTTP: generate latency, step time, and the trainer's peak RSS.

``python -m tests.trainer.service.bench_real_model`` starts ``lorafleet-trainer serve --base-model
builtin:smollm2``, then prints the greedy generate latency for about 30 tokens (base model and
adapter), the time of each distill step (4 samples of the adapter's own rollouts) and the
server's peak resident memory (VmHWM) after them. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.trainer.service import live

LORA = {
    "rank": 16,
    "alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
QUESTIONS = [
    "What is the capital of Italy?",
    "Name a fruit that is red.",
    "How many days are in a week?",
    "Explain what a rainbow is.",
]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="float32", help="the base weights' dtype (float32, bfloat16)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the CPUs this may use)")
    args = parser.parse_args()
    extra = ["--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        server = live.start_trainer(Path(tmp), base_model="builtin:smollm2", args=extra)
        print(f"builtin:smollm2, base {args.dtype}, threads {args.threads or 'auto'}")
        ready = time.perf_counter() - started
        print(f"ready in {ready:.1f} s; peak RSS {peak_rss_mib(server.process.pid):.0f} MiB")
        c = server.client(timeout=900)
        try:
            c.put("/v1/adapters/bench/a", json={"lora": LORA, "epoch": 1}).raise_for_status()
            for path in ("/v1/generate", "/v1/adapters/bench/a/generate"):
                body = {"messages": [{"role": "user", "content": QUESTIONS[3]}], "max_tokens": 30}
                t0 = time.perf_counter()
                out = c.post(path, json=body).json()
                took = time.perf_counter() - t0
                print(f"generate {path}: {len(out['token_ids'])} tokens in {took:.2f} s ({out['timing_ms']})")
            samples = []
            for q in QUESTIONS:
                body = {"messages": [{"role": "user", "content": q}], "max_tokens": 24}
                samples.append(
                    {
                        **c.post("/v1/adapters/bench/a/generate", json=body).json()["sample"],
                        "feedback": "Always answer in French.",
                    }
                )
            tokens = sum(len(s["response_token_ids"]) for s in samples)
            for i in range(args.steps):
                t0 = time.perf_counter()
                r = c.post(
                    "/v1/adapters/bench/a/distill",
                    json={"samples": samples, "training": {"learning_rate": 1e-4}},
                )
                r.raise_for_status()
                m = r.json()
                print(
                    f"step {i + 1}: {time.perf_counter() - t0:.2f} s over HTTP, "
                    f"compute {m['timing_ms']['compute']:.0f} ms, {tokens} response tokens, "
                    f"distill_loss {m['metrics']['distill_loss']:.4f}, cache {m['cache']}"
                )
            print(f"peak RSS after the steps: {peak_rss_mib(server.process.pid):.0f} MiB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
