"""What publishing costs a step: `python -m scripts.bench_publishing` (`make bench-publishing`).

A trainer and vLLM's CPU build serve the real model (builtin:smollm2), each pinned to a core of its
own, as they would be on separate machines (on a shared core, vLLM loading an adapter competes
with the step for the CPU, which says nothing about LoraFleet). One adapter trains back to back in
rounds: a few steps while the trainer publishes every version to vLLM (`PUT /v1/serving` names the
server), then a few with no server named. It prints each round's step times (the trainer's own
`timing_ms.total`: how long a step takes to answer), the overhead of publishing, and the publish
latency from the trainer's histogram, and writes them as JSON. It exits 1 when a speed target is
missed: those bounds live here, where each side has a core of its own, rather than in the serving
tests, which check what is served on cores they share with vLLM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from scripts import bench_servers
from tests.trainer.service.live import parse_metrics

from lorafleet_local import goals

ADAPTER = "/v1/adapters/bench/alice"
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# The speed targets: a step that publishes takes less than 1.5x one that does not, and 95 % of
# versions are served within 5 s of their commit (the serving loop test held both until they moved here).
MAX_OVERHEAD_RATIO = 1.5
PUBLISH_P95_S = 5.0


def _share_within(samples: dict[Any, float], seconds: float) -> float | None:
    """The share of publishes served within ``seconds`` of their commit, from the histogram bucket
    whose bound is ``seconds`` (one of the trainer's publish buckets)."""
    name = "lorafleet_trainer_publish_duration_seconds"
    count = samples.get((f"{name}_count", ()), 0.0)
    within = [
        v for (n, labels), v in samples.items() if n == f"{name}_bucket" and labels == (("le", str(seconds)),)
    ]
    return within[0] / count if within and count else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per round and mode")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench-publishing.json"))
    args = parser.parse_args(argv)
    if bench_servers.vllm_missing():
        return 2
    with bench_servers.trainer_and_vllm("bench-publishing-") as (trainer, vllm):
        c = trainer.client(timeout=900)
        assert (
            c.put(ADAPTER, json={"lora": LORA, "epoch": 1, "serving": {"name": "alice"}}).status_code == 201
        )
        suite = goals.Goal.of("alice").suite
        rollout = c.post(
            ADAPTER + "/rollouts",
            json={"prompts": [{"messages": suite.messages(suite.train[0])}], "max_tokens": 24,
                  "feedback": suite.feedback},
        )  # fmt: skip
        body = {"samples": [rollout.json()["rollouts"][0]["sample"]]}
        server = {"name": "vllm", "url": vllm.base_url}
        times: dict[str, list[float]] = {"publishing": [], "not_publishing": []}
        c.post(ADAPTER + "/distill", json=body)  # warm-up: first-step allocations
        for _ in range(args.rounds):
            for mode, servers in (("publishing", [server]), ("not_publishing", [])):
                c.put("/v1/serving", json={"servers": servers})
                for _ in range(args.steps):
                    answer = c.post(ADAPTER + "/distill", json=body).json()
                    times[mode].append(float(answer["timing_ms"]["total"]))
        samples = parse_metrics(c.get("/metrics").text)
        count, mean = bench_servers.publishes(samples)
        result: dict[str, Any] = {
            "step_ms_publishing_mean": statistics.mean(times["publishing"]),
            "step_ms_not_publishing_mean": statistics.mean(times["not_publishing"]),
            "step_ms_publishing_median": statistics.median(times["publishing"]),
            "step_ms_not_publishing_median": statistics.median(times["not_publishing"]),
            "publishes": count,
            "publish_latency_mean_s": mean,
            "vllm_start_s": vllm.ready_seconds,
            "steps": times,
        }
        ratio = result["step_ms_publishing_mean"] / result["step_ms_not_publishing_mean"]
        result["overhead_percent"] = 100.0 * (ratio - 1.0)
        within = _share_within(samples, PUBLISH_P95_S)
        result["publishes_within_5s_share"] = within
        result["targets_met"] = {
            f"step_publishing_under_{MAX_OVERHEAD_RATIO}x": ratio < MAX_OVERHEAD_RATIO,
            f"publish_p95_within_{PUBLISH_P95_S:g}s": within is not None and within >= 0.95,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
        missed = [name for name, met in result["targets_met"].items() if not met]
        if missed:
            print(f"speed targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
