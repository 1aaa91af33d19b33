"""Benchmark of the pure placement step: how long one decision takes as pools and fleets grow.

Each placement counts the adapters already on every pod (``placing.loads``) and picks the least
loaded pod (``placing.choose_pod``), as the operator does under the pool lock. Run:
``.venv/bin/python -m tests.operator.bench_placement``; it prints one line per size.
"""

from __future__ import annotations

import time

from lorafleet_operator import placing


def bench(pods: int, adapters: int) -> tuple[float, float]:
    views = [
        placing.PodView(f"p-{i}", f"u{i}", i, f"10.0.{i // 250}.{i % 250}", True, False, False, None)
        for i in range(pods)
    ]
    placed: list[str | None] = []
    start = time.perf_counter()
    for _ in range(adapters):
        chosen = placing.choose_pod(placing.loads(views, placed, {}, pods), 10**6)
        assert chosen is not None
        placed.append(chosen.name)
    total = time.perf_counter() - start
    # The last decision is the most expensive one: it counts every adapter already placed.
    start = time.perf_counter()
    placing.choose_pod(placing.loads(views, placed, {}, pods), 10**6)
    return total, time.perf_counter() - start


def main() -> None:
    print(f"{'pods':>6} {'adapters':>9} {'all placements':>15} {'last decision':>14}")
    for pods, adapters in [(2, 10), (8, 500), (64, 2000), (256, 10000)]:
        total, last = bench(pods, adapters)
        print(f"{pods:>6} {adapters:>9} {total * 1000:>12.1f} ms {last * 1e6:>11.0f} us")


if __name__ == "__main__":
    main()
