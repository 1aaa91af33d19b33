"""Benchmark: the latency the HTTP layer adds to a warm distill step (builtin models, CPU).

Starts a live trainer, warms one adapter, then for each step compares the client-observed time
with the server's own ``timing_ms.total`` (acceptance to result, queue included). The difference
is JSON parsing, validation, routing, the response and the loopback round trip.
Run: ``python -m tests.trainer.service.bench_http [--steps 30] [--base-model builtin:tiny]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.trainer.service import live, payloads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--base-model", default="builtin:tiny")
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = live.start_trainer(Path(tmp), base_model=args.base_model)
        try:
            c = server.client()
            c.put("/v1/adapters/bench/a", json=payloads.init_body()).raise_for_status()
            body = payloads.distill_body(n=args.samples)
            c.post("/v1/adapters/bench/a/distill", json=body).raise_for_status()  # the miss
            client_ms, server_ms, compute_ms = [], [], []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r = c.post("/v1/adapters/bench/a/distill", json=body)
                client_ms.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                assert r.json()["cache"] == "hit"
                server_ms.append(r.json()["timing_ms"]["total"])
                compute_ms.append(r.json()["timing_ms"]["compute"])
        finally:
            server.stop()
    overhead = [a - b for a, b in zip(client_ms, server_ms, strict=True)]
    print(f"base model {args.base_model}, {args.steps} warm steps, {args.samples} sample(s) each")
    for name, xs in [("client", client_ms), ("server total", server_ms), ("compute", compute_ms)]:
        print(f"{name:>14}: median {statistics.median(xs):8.2f} ms  p90 {_p90(xs):8.2f} ms")
    for name, xs in [("http overhead", overhead)]:
        print(f"{name:>14}: median {statistics.median(xs):8.2f} ms  p90 {_p90(xs):8.2f} ms")


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


if __name__ == "__main__":
    main()
