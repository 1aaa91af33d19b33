"""CUDA residency: in offload mode a step gives back every byte of GPU memory it took.

Skipped without a CUDA device; the CPU path is covered by every other engine test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.trainer.engine_helpers import max_diff, samples, stored_state

from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
LORA = LoraSpec(rank=4, alpha=8.0)
A, B = AdapterId("gpu", "alice"), AdapterId("gpu", "bob")


def test_offload_returns_gpu_memory_to_its_level_before_the_step(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(device="cuda", gpu_residency="offload")
    assert engine.device.type == "cuda"
    for adapter in (A, B):
        engine.init_adapter(adapter, LORA, 1)
    # One unmeasured step: CUDA libraries allocate their lasting workspaces on first use.
    engine.distill(A, samples(0))

    def measured(adapter: AdapterId, seed: int) -> bool:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        step = engine.distill(adapter, samples(seed))
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before, (adapter, seed, step.cache_hit)
        return step.cache_hit

    assert measured(B, 1) is False  # cold: restored from storage
    assert measured(A, 2) is True  # warm: restored from the pinned cache
    assert measured(B, 3) is True
    engine.evict(A)
    assert measured(A, 4) is False
    stats = engine.stats()
    assert stats.gpu_memory_peak_bytes > stats.gpu_memory_allocated_bytes
    assert stats.host_pinned_bytes > 0


def test_cuda_and_cpu_train_alike(make_engine: Callable[..., Any]) -> None:
    gpu = make_engine(device="cuda", gpu_residency="keep", root="keep")
    cpu = make_engine(device="cpu", root="cpu")
    for engine in (gpu, cpu):
        engine.init_adapter(A, LORA, 1)
        # One step: later Adam steps divide by tiny second moments, which amplifies rounding.
        engine.distill(A, samples(0))
    assert torch.cuda.memory_allocated() > 0  # keep: the base stays on the device
    assert max_diff(stored_state(gpu.store, A), stored_state(cpu.store, A)) < 1e-3


def test_offload_keep_and_cpu_agree_over_swaps(make_engine: Callable[..., Any]) -> None:
    engines = {
        "offload": make_engine(device="cuda", gpu_residency="offload", dtype="float32", root="off"),
        "keep": make_engine(device="cuda", gpu_residency="keep", dtype="float32", root="keep"),
        "cpu": make_engine(device="cpu", root="cpu"),
    }
    for engine in engines.values():
        for adapter in (A, B):
            engine.init_adapter(adapter, LORA, 1)
        for i, adapter in enumerate((A, B, A, B)):  # every step swaps the shared slot
            assert engine.distill(adapter, samples(i)).version == (i // 2) + 1
    for adapter in (A, B):
        cpu = stored_state(engines["cpu"].store, adapter)
        for mode in ("offload", "keep"):
            # Two Adam steps per adapter: rounding differences stay small (see the one-step test).
            assert max_diff(stored_state(engines[mode].store, adapter), cpu) < 1e-3, (mode, adapter)
        assert (
            max_diff(
                stored_state(engines["offload"].store, adapter), stored_state(engines["keep"].store, adapter)
            )
            < 1e-4
        )


def test_every_tensor_is_where_its_mode_puts_it(make_engine: Callable[..., Any]) -> None:
    keep = make_engine(device="cuda", gpu_residency="keep", root="keep")
    off = make_engine(device="cuda", gpu_residency="offload", root="off")
    for engine in (keep, off):
        engine.init_adapter(A, LORA, 1)
        engine.distill(A, samples(0))
        engine.distill(A, samples(1))
        entry = engine.cache.peek(A)
        slot = engine._slot(LORA)
        assert entry is not None and entry.flat.is_pinned() and not entry.flat.is_cuda
        assert slot.spare is not None and slot.spare.flat.is_pinned()
    assert keep.dtype == torch.bfloat16  # the CUDA default
    assert all(p.is_cuda for p in keep._model.parameters())
    assert keep._slot(LORA).state.flat.is_cuda
    # offload: between steps nothing is on the device; the base is page-locked on the host.
    assert not any(p.is_cuda for p in off._model.parameters())
    assert all(p.is_pinned() for p in off._model.parameters() if not p.requires_grad)
    assert not off._slot(LORA).state.flat.is_cuda
    assert off.stats().gpu_memory_after_step_bytes == torch.cuda.memory_allocated()
    assert off.stats().host_pinned_bytes >= entry.nbytes
