"""The first-GPU check: everything the CPU cannot show about the trainer's device paths, in one run.

`make gpu-smoke` runs it. On a CUDA machine it runs the `gpu`-marked tests (offload vs keep vs CPU
over A/B/A/B swaps, where every tensor lives, memory returned after offloaded steps), counts the
synchronisations of one warm step under ``torch.cuda.set_sync_debug_mode("warn")``, counts the
profiler's host<->device copies of one warm step against the minimum, and runs `make bench-gpu`
(whose bandwidth figures compare the adapter-state copy with a plain pinned copy of the same
bytes). On the CPU it runs what can run (the CPU traffic and dtype tests, a quick CPU bench) and
names each device part it skipped. It ends with a summary to paste into the README.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The minimum per warm step that swaps adapters (see tests/trainer/test_step_traffic.py): state up,
# batch up, state down; metrics read and the snapshot's finiteness read. Offload adds the base
# (one copy per dtype) up.
MIN_SYNCS = 2
MIN_H2D = 2
MIN_D2H = 1


def _run(cmd: list[str]) -> tuple[bool, str]:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=False)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return done.returncode == 0, tail


def _engine(mode: str) -> Any:
    from tests.trainer.engine_helpers import FAST_TRAINING

    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
    from lorafleet_trainer.ids import AdapterId
    from lorafleet_trainer.learning.configs import LoraSpec

    engine = TrainerEngine(
        EngineConfig(
            storage_root=Path(tempfile.mkdtemp(prefix="gpu-smoke-")),
            cache_capacity_bytes=1 << 30,
            device="cuda",
            gpu_residency=mode,
            default_training=FAST_TRAINING,
        )
    )
    engine.load()
    lora = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    a, b = AdapterId("smoke", "a"), AdapterId("smoke", "b")
    for adapter in (a, b):
        engine.init_adapter(adapter, lora, 1)
    from tests.trainer.engine_helpers import samples

    for i, adapter in enumerate((a, b, a)):  # warm: every buffer exists, the slot holds a
        engine.distill(adapter, samples(i))
    return engine, b, samples(9)


def sync_count(mode: str) -> int:
    """Synchronising CUDA calls in one warm swapping step (warnings of the sync debug mode)."""
    import torch

    engine, adapter, batch = _engine(mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.distill(adapter, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        print(f"  sync: {w.filename}:{w.lineno}: {w.message}")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def copy_count(mode: str) -> dict[str, int]:
    """Host<->device copies (and their bytes, where the profiler reports them) in one warm step."""
    from torch.profiler import ProfilerActivity, profile

    engine, adapter, batch = _engine(mode)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.distill(adapter, batch)
    out = {"h2d": 0, "d2h": 0, "h2d_bytes": 0, "d2h_bytes": 0}
    for evt in prof.events():
        name = evt.name.lower()
        kind = "h2d" if "htod" in name else "d2h" if "dtoh" in name else None
        if kind is None or not name.startswith("memcpy"):
            continue
        out[kind] += 1
        nbytes = getattr(evt, "bytes", None) or (getattr(evt, "kwinputs", None) or {}).get("bytes", 0)
        out[f"{kind}_bytes"] += int(nbytes or 0)
    return out


def main() -> int:
    import torch

    summary: list[str] = []
    skipped: list[str] = []
    ok = True
    cuda = torch.cuda.is_available()
    reason = "no CUDA device on this machine"
    py = sys.executable

    passed, tail = _run(
        [py, "-m", "pytest", "tests/trainer/test_step_traffic.py", "tests/trainer/test_dtype.py", "-q"]
    )
    ok &= passed
    summary.append(f"CPU traffic and dtype tests: {tail}")
    if cuda:
        passed, tail = _run([py, "-m", "pytest", "tests/trainer", "-m", "gpu", "-q"])
        ok &= passed
        summary.append(f"GPU tests (equivalence over A/B/A/B, placement, memory): {tail}")
        for mode in ("keep", "offload"):
            syncs = sync_count(mode)
            summary.append(
                f"syncs per warm step ({mode}, sync debug mode): {syncs} (ours: minimum {MIN_SYNCS})"
            )
            copies = copy_count(mode)
            base = " + base (one per dtype)" if mode == "offload" else ""
            summary.append(
                f"profiler copies per warm step ({mode}): H2D {copies['h2d']} ({copies['h2d_bytes']} B), "
                f"D2H {copies['d2h']} ({copies['d2h_bytes']} B); minimum H2D {MIN_H2D}{base}, D2H {MIN_D2H}"
            )
        passed, tail = _run(["make", "bench-gpu"])
        ok &= passed
        summary.append(f"make bench-gpu: {tail} (bench-results/bench-gpu.bandwidth.json)")
    else:
        skipped += [
            "GPU tests (offload vs keep vs CPU over A/B/A/B, pinned and device placement)",
            "sync count under torch.cuda.set_sync_debug_mode('warn')",
            "profiler H2D/D2H copies against the minimum",
            "make bench-gpu (bandwidth against a plain pinned copy of the same bytes)",
        ]
        passed, tail = _run(
            [py, "-m", "lorafleet_trainer.bench", "--quick", "--modes", "cached", "--device", "cpu"]
        )
        ok &= passed
        summary.append(f"CPU bench (quick, cached): {tail}")
    print("\n==== gpu-smoke summary (paste into the README) ====")
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU only'}; torch {torch.__version__}")
    for line in summary:
        print(f"- {line}")
    for part in skipped:
        print(f"- SKIPPED ({reason}): {part}")
    print("result: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
