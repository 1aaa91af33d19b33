"""What publishing costs a step: `python -m scripts.bench_publishing` (`make bench-publishing`).

A trainer and vLLM's CPU build serve the real model (builtin:smollm2), each pinned to a core of its
own, as they would be on separate machines (on a shared core, vLLM loading an adapter competes
with the step for the CPU, which says nothing about LoraFleet). One adapter trains back to back in
rounds: a few steps while the trainer publishes every version to vLLM (`PUT /v1/serving` names the
server), then a few with no server named. It prints each round's step times (the trainer's own
`timing_ms.total`: how long a step takes to answer), the overhead of publishing, and the publish
latency from the trainer's histogram, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.serving import live_vllm
from tests.trainer.service import live
from tests.trainer.service.live import parse_metrics

from lorafleet_local import goals

ADAPTER = "/v1/adapters/bench/alice"
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _on_core(cpu: int) -> None:
    """Run this process (and so the children it starts next) on one core, when there is one."""
    if cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per round and mode")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench-publishing.json"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-publishing-"))
    if not live_vllm.python().exists():
        print(f"no vLLM virtualenv at {live_vllm.VENV}: run `make vllm`", file=sys.stderr)
        return 2
    from lorafleet_trainer import models  # the trainer's model cache: the same directory vLLM serves

    model = Path(models.resolve("builtin:smollm2"))
    every_core = os.sched_getaffinity(0)
    _on_core(1)
    vllm = live_vllm.launch_vllm(workdir / "vllm", model, "smollm2")
    _on_core(0)
    trainer = live.start_trainer(
        workdir / "trainer", base_model="builtin:smollm2", args=["--threads", "1"], ready_timeout=900
    )
    os.sched_setaffinity(0, every_core)
    try:
        live_vllm.wait_healthy(vllm)
        c = trainer.client(timeout=900)
        assert (
            c.put(ADAPTER, json={"lora": LORA, "epoch": 1, "serving": {"name": "alice"}}).status_code == 201
        )
        goal = goals.Goal.of("alice")
        rollout = c.post(
            ADAPTER + "/generate", json={"messages": goal.messages(goal.questions[0]), "max_tokens": 24}
        )
        body = {
            "samples": [{**rollout.json()["sample"], "feedback": goal.feedback}],
            "training": goal.training,
        }
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
        count = samples.get(("lorafleet_trainer_publish_duration_seconds_count", ()), 0.0)
        total = samples.get(("lorafleet_trainer_publish_duration_seconds_sum", ()), 0.0)
        result: dict[str, Any] = {
            "step_ms_publishing_mean": statistics.mean(times["publishing"]),
            "step_ms_not_publishing_mean": statistics.mean(times["not_publishing"]),
            "step_ms_publishing_median": statistics.median(times["publishing"]),
            "step_ms_not_publishing_median": statistics.median(times["not_publishing"]),
            "publishes": count,
            "publish_latency_mean_s": total / count if count else None,
            "vllm_start_s": vllm.ready_seconds,
            "steps": times,
        }
        result["overhead_percent"] = 100.0 * (
            result["step_ms_publishing_mean"] / result["step_ms_not_publishing_mean"] - 1.0
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
        return 0
    finally:
        trainer.stop()
        vllm.stop()


if __name__ == "__main__":
    sys.exit(main())
