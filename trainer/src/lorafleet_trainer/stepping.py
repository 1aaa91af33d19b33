"""One SDPO update on the active slot: check a batch against the model, run it, apply AdamW.

``prepare`` does every check that needs the model (token ids within the vocabulary, sequence
lengths within its context) and builds the teacher prompts, before any adapter state is touched.
``train_step`` runs the frozen teacher (and, with a KL weight, the frozen base) with the adapter
disabled, the student with it enabled, and refuses to apply an update whose loss or gradient is
not finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer import prompting, sdpo
from lorafleet_trainer.configs import TrainingSpec
from lorafleet_trainer.errors import InvalidInput, NonFiniteLoss
from lorafleet_trainer.samples import DistillSample
from lorafleet_trainer.slots import LoraSlot


@dataclass(frozen=True)
class Prepared:
    student_ids: list[int]
    teacher_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]


def prepare(
    samples: Sequence[DistillSample], tokenizer: Any, vocab_size: int, max_positions: int
) -> list[Prepared]:
    if not samples:
        raise InvalidInput("must be a non-empty list of samples", field="samples")
    out: list[Prepared] = []
    for i, s in enumerate(samples):
        for name in ("prompt_token_ids", "response_token_ids"):
            for j, tok in enumerate(getattr(s, name)):
                if tok >= vocab_size:
                    raise InvalidInput(
                        f"token id {tok} is outside the model's vocabulary of {vocab_size}",
                        field=f"samples[{i}].{name}[{j}]",
                    )
        student = s.prompt_token_ids + s.response_token_ids
        teacher = prompting.teacher_prompt_ids(tokenizer, s) + s.response_token_ids
        for label, seq in (("prompt and response", student), ("teacher prompt and response", teacher)):
            if len(seq) > max_positions:
                raise InvalidInput(
                    f"{label} take {len(seq)} tokens; the model's context is {max_positions}",
                    field=f"samples[{i}]",
                )
        out.append(Prepared(student, teacher, s.response_token_ids, s.response_logprobs))
    return out


def _response_logits(model: Any, ids: list[int], n: int, device: torch.device) -> torch.Tensor:
    """Logits predicting the last ``n`` tokens of ``ids`` (only those rows go through the head)."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    return model(input_ids=x, logits_to_keep=n + 1).logits[0, :-1]


def train_step(
    model: Any, slot: LoraSlot, spec: TrainingSpec, batch: list[Prepared], device: torch.device
) -> dict[str, float]:
    """Forward, SDPO loss, backward, clip, AdamW. Raises NonFiniteLoss before any update."""
    opt = slot.optimizer
    for group in opt.param_groups:
        group["lr"] = spec.learning_rate
    opt.zero_grad(set_to_none=True)
    student, teacher, base = [], [], []
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        for ex in batch:
            n = len(ex.response_ids)
            teacher.append(_response_logits(model, ex.teacher_ids, n, device))
            if spec.kl_reg_weight > 0.0:
                base.append(_response_logits(model, ex.student_ids, n, device))
    # Train mode only matters for LoRA dropout; the base model's own dropouts are 0.
    model.train(slot.lora.dropout > 0.0)
    try:
        for ex in batch:
            student.append(_response_logits(model, ex.student_ids, len(ex.response_ids), device))
    finally:
        model.eval()
    terms = sdpo.sdpo_loss(
        torch.cat(student),
        torch.cat(teacher),
        torch.tensor([t for ex in batch for t in ex.response_ids], device=device),
        torch.tensor([lp for ex in batch for lp in ex.old_logprobs], device=device),
        alpha=spec.alpha,
        is_clip=spec.is_clip,
        top_k=spec.teacher_top_k,
        kl_reg_weight=spec.kl_reg_weight,
        base_logits=torch.cat(base) if base else None,
    )
    total = float(terms.total.detach())
    if not math.isfinite(total):
        raise NonFiniteLoss(f"the loss is {total}; nothing was applied", field="samples")
    terms.total.backward()
    params = [slot.params[k] for k in slot.keys]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm))
    if not math.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"the gradient norm is {grad_norm}; nothing was applied", field="samples")
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise NonFiniteLoss("the update made a weight non-finite; nothing was committed", field="training")
    return {
        "total_loss": total,
        "distill_loss": float(terms.distill.detach()),
        "kl_reg": float(terms.kl_reg.detach()),
        "mean_is_ratio": terms.mean_is_ratio,
        "clip_fraction": terms.clip_fraction,
        "grad_norm": grad_norm,
        "tokens_processed": float(terms.tokens),
        "batch_size": float(len(batch)),
    }
