"""The benchmarks' pair of servers: a trainer and vLLM's CPU build on the real model, a core each.

`make bench-publishing` and `make bench-gateway` both time what happens between a trainer and an
inference server. Each is pinned to a core of its own, as on separate machines: on a shared core,
vLLM's work competes with the step for the CPU, which says nothing about LoraFleet.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.serving import live_vllm
from tests.trainer.service import live

PUBLISH = "lorafleet_trainer_publish_duration_seconds"


def vllm_missing() -> bool:
    """True (and says so) when vLLM's virtualenv is not there: `make vllm` makes it."""
    if live_vllm.python().exists():
        return False
    print(f"no vLLM virtualenv at {live_vllm.VENV}: run `make vllm`", file=sys.stderr)
    return True


def _on_core(cpu: int) -> None:
    """Run this process (and so the children it starts next) on one core, when there is one."""
    if cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


@contextmanager
def trainer_and_vllm(prefix: str) -> Iterator[tuple[live.LiveTrainer, live_vllm.LiveVllm]]:
    """A trainer (one thread, core 0) and vLLM serving the model directory the trainer resolves
    builtin:smollm2 to (core 1) as `smollm2`, vLLM healthy; both stopped on exit."""
    from lorafleet_trainer.models import models  # the trainer's model cache: the same directory vLLM serves

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
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
        yield trainer, vllm
    finally:
        trainer.stop()
        vllm.stop()


def publishes(samples: dict[Any, float]) -> tuple[float, float | None]:
    """How many versions the trainer published, and their mean seconds from commit to served
    (None when none), from its parsed /metrics."""
    count = samples.get((f"{PUBLISH}_count", ()), 0.0)
    total = samples.get((f"{PUBLISH}_sum", ()), 0.0)
    return count, total / count if count else None
