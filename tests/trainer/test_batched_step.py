"""A step's samples as padded batches: the same loss, gradients and update as one forward per
sample (a token budget of 1), within float tolerance, whatever the micro-batch split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.trainer.engine_helpers import sample_dict

from lorafleet_trainer.engine import stepping
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
A = AdapterId("team-a", "batched")
# Prompts and responses of different lengths, so the padded rows really are padded.
SHAPES = [(6, 5), (14, 3), (3, 9), (9, 7), (20, 4)]


def samples(round_: int) -> list[DistillSample]:
    return [
        DistillSample.from_dict(sample_dict(100 * round_ + i, prompt_len=p, response_len=r))
        for i, (p, r) in enumerate(SHAPES)
    ]


def prepared(rows: list[tuple[int, int, int]]) -> list[stepping.Prepared]:
    """(student length, teacher length, response length) per sample."""
    return [stepping.Prepared([1] * s, [1] * t, [1] * r, [-1.0] * r) for s, t, r in rows]


def test_micro_batches_keep_the_order_and_stay_within_the_budget() -> None:
    batch = stepping.Batch.pack(
        prepared([(10, 20, 3), (10, 12, 2), (30, 40, 5), (5, 8, 1)]), pin=False, token_budget=45
    )
    assert [m.lengths for m in batch.micro] == [(3, 2), (5,), (1,)]  # 2 x 20 = 40; 40 runs alone
    assert [m.response for m in batch.micro] == [(0, 5), (5, 10), (10, 11)]
    for micro in batch.micro:
        for block in (micro.student, micro.teacher):
            ids, mask = block.tensors(batch.packed)
            assert ids.shape == mask.shape == (block.rows, block.width)
            # Left-padded: each row's real tokens end at the last column.
            assert bool((mask[:, -1] == 1).all()) and bool((mask.sum(1) > 0).all())
    one = stepping.Batch.pack(prepared([(10, 20, 3), (10, 12, 2)]), pin=False)
    assert [m.lengths for m in one.micro] == [(3, 2)]
    alone = stepping.Batch.pack(prepared([(10, 20, 3), (10, 12, 2)]), pin=False, token_budget=1)
    assert [m.lengths for m in alone.micro] == [(3,), (2,)]


def gradients(engine: Any, spec: TrainingSpec, budget: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One step's loss terms and (clipped) gradients for ``samples(1)`` at ``budget``, nothing applied."""
    slot = engine._slot(LORA)
    engine._slots.activate(slot)
    engine._restore(A, engine._meta_for(A), slot)
    prepared = stepping.prepare(
        samples(1), engine._tokenizer, engine._vocab_size, engine._max_positions, spec
    )
    batch = stepping.Batch.pack(prepared, pin=False, token_budget=budget)
    for key in slot.keys:
        slot.params[key].grad = None
    values = stepping._loss_and_gradients(
        engine._slots.peft_model, slot, spec, batch, engine.device, engine.dtype
    )
    grads = {key: slot.params[key].grad.clone() for key in slot.keys}
    for key in slot.keys:
        slot.params[key].grad = None
    return values, grads


@pytest.mark.parametrize(
    "training",
    [
        pytest.param(TrainingSpec(learning_rate=1e-2, teacher_top_k=16), id="defaults"),
        pytest.param(
            TrainingSpec(learning_rate=1e-2, teacher_top_k=16, alpha=0.5, kl_reg_weight=0.1), id="jsd-kl"
        ),
        pytest.param(TrainingSpec(learning_rate=1e-2, teacher_top_k=16, teacher="ema"), id="ema-teacher"),
    ],
)
def test_padded_batches_give_the_per_sample_loss_and_gradients(
    make_engine: Callable[..., Any], training: TrainingSpec
) -> None:
    engine = make_engine(default_training=training)
    engine.init_adapter(A, LORA, 1)
    engine.distill(A, samples(0))  # LoRA B moves off zero, so every gradient is live
    prepared = stepping.prepare(
        samples(1), engine._tokenizer, engine._vocab_size, engine._max_positions, training
    )
    assert len(stepping.Batch.pack(prepared, pin=False, token_budget=90).micro) >= 2  # really split
    per_sample, reference = gradients(engine, training, 1)
    assert any(float(g.abs().max()) > 0 for g in reference.values())
    for budget in (90, 1 << 20):
        values, grads = gradients(engine, training, budget)
        assert max(abs(a - b) for a, b in zip(values, per_sample, strict=True)) < 1e-5, (
            budget,
            values,
            per_sample,
        )
        worst = max(float((grads[k] - reference[k]).abs().max()) for k in reference)
        assert worst < 1e-5, (budget, worst)
    # The engine's own steps take the budget it is configured with, and count every token.
    assert engine.distill(A, samples(2)).metrics["tokens_processed"] == sum(r for _, r in SHAPES)


def _logits(model: Any, rows: list[list[int]], lengths: list[int]) -> torch.Tensor:
    parts: list[int] = []
    block = stepping._pad_left(parts, rows)
    picks = stepping.pick_rows(parts, lengths)
    with torch.no_grad():
        return stepping.response_logits(model, torch.tensor(parts), block, lengths, picks)


def test_a_padded_forward_gives_each_rows_own_logits(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    engine.distill(A, samples(0))
    slot = engine._slot(LORA)
    engine._slots.activate(slot)
    engine._restore(A, engine._meta_for(A), slot)
    model = engine._slots.peft_model
    rows = [list(range(3, 12)), list(range(40, 44)), list(range(7, 27))]
    lengths = [4, 2, 6]
    together = _logits(model, rows, lengths)
    alone = torch.cat([_logits(model, [row], [n]) for row, n in zip(rows, lengths, strict=True)])
    assert together.shape[0] == sum(lengths)
    assert torch.allclose(together, alone, atol=1e-5), float((together - alone).abs().max())
