"""Replay a ledger of steps in a fresh in-process engine and compare with what a trainer stored.

Steps are deterministic on the CPU: the LoRA init is seeded from the adapter's id, dropout is 0 and
the samples come from seeds, so the weights after the applied steps are a function of the ledger.
A lost, doubled or half-applied step shows up as a difference far above float noise.
"""

from __future__ import annotations

from pathlib import Path

from tests.reliability import killing
from tests.trainer.service import payloads

from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
from lorafleet_trainer.engine.storage import AdapterStore
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec
from lorafleet_trainer.learning.samples import DistillSample

# Different thread counts may reorder float sums between the server and this process.
TOLERANCE = 1e-5


def replay(storage: Path, model_cache: Path, applied: list[int]) -> StateBundle:
    adapter = AdapterId(killing.NAMESPACE, killing.NAME)
    config = EngineConfig(
        storage_root=storage, cache_capacity_bytes=1 << 28, device="cpu", model_cache_dir=model_cache
    )
    engine = TrainerEngine(config)
    engine.load()
    engine.init_adapter(adapter, LoraSpec.from_dict(payloads.LORA), epoch=1)
    for seed in applied:
        samples = [DistillSample.from_dict(s) for s in killing.step_samples(seed)]
        engine.distill(adapter, samples, killing.TRAINING)
    return engine.store.read_tensors(adapter)


def stored_tensors(storage: Path) -> StateBundle:
    return AdapterStore(storage).read_tensors(AdapterId(killing.NAMESPACE, killing.NAME))


def max_difference(a: StateBundle, b: StateBundle) -> float:
    """The largest absolute difference over weights, both AdamW moments and the weights' EMA."""
    worst = 0.0
    pairs = ((a.weights, b.weights), (a.exp_avg, b.exp_avg), (a.exp_avg_sq, b.exp_avg_sq), (a.ema, b.ema))
    for x, y in pairs:
        assert sorted(x) == sorted(y)
        for k in x:
            worst = max(worst, float((x[k].double() - y[k].double()).abs().max()))
    assert a.step == b.step, f"optimizer step {a.step} != {b.step}"
    return worst
