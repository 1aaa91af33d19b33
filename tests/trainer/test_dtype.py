"""A reduced-precision base: bf16 base weights train fp32 LoRA state to what an fp32 base gives.

Tolerances (builtin:tiny, 3 steps of lr 1e-2 on one batch): the first loss, computed from the
same initial weights, within 2% of fp32's (measured 0.4%); the loss falls in both; the total
LoRA update points the same way as fp32's (cosine similarity above 0.95; measured 0.99 after 5
steps, where Adam's division by small second moments amplifies rounding most).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.trainer.engine_helpers import samples

from lorafleet_trainer.engine import engine as engine_module
from lorafleet_trainer.engine.bundles import STATE_DTYPE
from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
from lorafleet_trainer.errors import InvalidInput
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
A = AdapterId("dtype", "alice")
STEPS = 3


def _train(engine: TrainerEngine) -> tuple[list[float], torch.Tensor]:
    engine.init_adapter(A, LORA, 1)
    start = engine.store.read_tensors(A).section("w").clone()
    losses = [engine.distill(A, samples(0)).metrics["total_loss"] for _ in range(STEPS)]
    return losses, engine.store.read_tensors(A).section("w") - start


def test_bf16_base_trains_like_fp32(make_engine: Callable[..., Any]) -> None:
    fp32 = make_engine(root="fp32", dtype="float32")
    bf16 = make_engine(root="bf16", dtype="bfloat16")
    # Before any slot exists the model's parameters are the base's own.
    assert {p.dtype for p in fp32._model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16._model.parameters()} == {torch.bfloat16}
    loss32, update32 = _train(fp32)
    loss16, update16 = _train(bf16)
    # LoRA weights, moments and what is stored stay fp32 whatever the base.
    slot = bf16._slot(LORA)
    assert all(p.dtype == STATE_DTYPE for p in slot.params.values())
    assert bf16.store.read_tensors(A).flat.dtype == STATE_DTYPE
    assert abs(loss16[0] - loss32[0]) <= 0.02 * loss32[0]
    assert loss16[-1] < loss16[0] and loss32[-1] < loss32[0]
    cosine = float(torch.nn.functional.cosine_similarity(update16, update32, dim=0))
    assert cosine > 0.95, cosine


def test_dtype_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as bad:
        EngineConfig(storage_root=tmp_path, dtype="int8")
    assert bad.value.field == "dtype"
    with pytest.raises(InvalidInput) as half:
        TrainerEngine(EngineConfig(storage_root=tmp_path, device="cpu", dtype="float16"))
    assert half.value.field == "dtype"
    assert TrainerEngine(EngineConfig(storage_root=tmp_path, device="cpu")).dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_matmul_is_warned_about(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # On an AVX2 CPU a bf16 step of builtin:smollm2 took 43 s against 5.8 s in float32.
    monkeypatch.setattr(engine_module, "cpu_has_bf16_matmul", lambda: native)
    with caplog.at_level(logging.WARNING, logger="lorafleet_trainer.engine.engine"):
        assert engine_module._resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert bool(warned) is not native
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafleet_trainer.engine.engine"):
        assert engine_module._resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert not caplog.records
