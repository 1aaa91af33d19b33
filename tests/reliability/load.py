"""Load on live trainers: many adapters, concurrent clients, a cache smaller than the working set.

Adapters are spread round-robin over the trainers. Each client thread draws (seeded) adapters and
posts one step at a time; a 429 must carry ``Retry-After`` and is retried after it. The run records
every answered version per adapter (so exactly-once can be checked against the stored version),
latencies of answered steps, 429s, and each trainer's peak resident memory sampled from /proc.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tests.reliability import killing
from tests.trainer.service import live, payloads

NAMESPACE = "load"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class LoadResult:
    answered: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    latencies: list[float] = field(default_factory=list)
    rejected_429: int = 0
    missing_retry_after: int = 0
    other_errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss: dict[int, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def adapter_name(i: int) -> str:
    return f"a{i:04d}"


def owner(trainers: list[live.LiveTrainer], i: int) -> live.LiveTrainer:
    return trainers[i % len(trainers)]


def init_all(trainers: list[live.LiveTrainer], adapters: int) -> None:
    for i in range(adapters):
        r = (
            owner(trainers, i)
            .client()
            .put(f"/v1/adapters/{NAMESPACE}/{adapter_name(i)}", json=payloads.init_body(1))
        )
        assert r.status_code in (200, 201), r.text


def drive(trainers: list[live.LiveTrainer], adapters: int, threads: int, steps: int, seed: int) -> LoadResult:
    """Post ``steps`` answered steps in total from ``threads`` clients; sample RSS meanwhile."""
    result = LoadResult()
    lock = threading.Lock()
    remaining = [steps]
    stop_sampling = threading.Event()

    def sample_rss() -> None:
        while not stop_sampling.wait(0.2):
            for t in trainers:
                rss = rss_bytes(t.process.pid)
                result.peak_rss[t.process.pid] = max(result.peak_rss.get(t.process.pid, 0), rss)

    def client_loop(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        clients = [
            httpx.Client(base_url=t.base_url, headers={"authorization": f"Bearer {t.token}"}, timeout=300)
            for t in trainers
        ]
        try:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                i = rng.randrange(adapters)
                route = f"/v1/adapters/{NAMESPACE}/{adapter_name(i)}/distill"
                client = clients[i % len(trainers)]
                while True:
                    t0 = time.perf_counter()
                    r = client.post(route, json=killing.body(rng.randrange(1_000_000)))
                    if r.status_code == 429:
                        retry = r.headers.get("retry-after")
                        with lock:
                            result.rejected_429 += 1
                            result.missing_retry_after += retry is None
                        time.sleep(min(float(retry or 1), 2.0) * rng.uniform(0.5, 1.0))
                        continue
                    with lock:
                        if r.status_code == 200:
                            result.answered[adapter_name(i)].append(int(r.json()["version"]))
                            result.latencies.append(time.perf_counter() - t0)
                        else:
                            result.other_errors.append(f"{r.status_code} {r.text[:200]}")
                    break
        finally:
            for c in clients:
                c.close()

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client_loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result.wall_s = time.perf_counter() - t0
    stop_sampling.set()
    sampler.join()
    return result


def hit_ratio(trainers: list[live.LiveTrainer]) -> float:
    hits = misses = 0.0
    for t in trainers:
        m = t.metrics()
        hits += m[("lorafleet_trainer_cache_hits_total", ())]
        misses += m[("lorafleet_trainer_cache_misses_total", ())]
    return hits / max(1.0, hits + misses)
