"""One SDPO update on the active slot: check a batch against the model, run it, apply AdamW.

``prepare`` does every check that needs the model (token ids within the vocabulary, sequence
lengths within its context) and builds the teacher prompts, before any adapter state is touched.
``train_step`` runs the teacher (the frozen base with the adapter disabled, or the base with the
EMA of the adapter's weights) and, with a KL weight, the frozen base, then the student with the
adapter enabled, and refuses to apply an update whose loss or gradient is
not finite. A step moves the minimum between host and device: the packed batch up in one copy,
the metrics down in one read (the one wait that decides whether to apply the update).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer.engine.slots import LoraSlot
from lorafleet_trainer.errors import InvalidInput, NonFiniteLoss
from lorafleet_trainer.learning import prompting, sdpo
from lorafleet_trainer.learning.configs import TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample


@dataclass(frozen=True)
class Prepared:
    student_ids: list[int]
    teacher_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]


def prepare(
    samples: Sequence[DistillSample], tokenizer: Any, vocab_size: int, max_positions: int, spec: TrainingSpec
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
        given = prompting.TeacherInput.of(s)
        teacher_prompt = prompting.teacher_prompt_ids(
            tokenizer, given, spec.teacher_template, spec.teacher_custom_template
        )
        teacher = teacher_prompt + s.response_token_ids
        for label, seq in (("prompt and response", student), ("teacher prompt and response", teacher)):
            if len(seq) > max_positions:
                raise InvalidInput(
                    f"{label} take {len(seq)} tokens; the model's context is {max_positions}",
                    field=f"samples[{i}]",
                )
        out.append(Prepared(student, teacher, s.response_token_ids, s.response_logprobs))
    return out


@dataclass(frozen=True)
class Batch:
    """A prepared batch packed into one host tensor, so it reaches the device in one copy.

    Every id sequence (students, teachers, responses) is int64; the sampler's log-probabilities
    ride along as float64 bit patterns in the same tensor and are viewed back on the device.
    """

    packed: torch.Tensor
    spans: dict[str, list[tuple[int, int]]]  # "student"/"teacher" -> (start, end) per sample
    response: tuple[int, int]
    logprobs: tuple[int, int]
    response_lengths: list[int]

    @classmethod
    def pack(cls, batch: list[Prepared], pin: bool) -> Batch:
        parts: list[int] = []
        spans: dict[str, list[tuple[int, int]]] = {"student": [], "teacher": []}
        for ex in batch:
            for name, seq in (("student", ex.student_ids), ("teacher", ex.teacher_ids)):
                spans[name].append((len(parts), len(parts) + len(seq)))
                parts.extend(seq)
        response = [t for ex in batch for t in ex.response_ids]
        start = len(parts)
        parts.extend(response)
        ids = torch.tensor(parts, dtype=torch.int64)
        logprobs = torch.tensor([lp for ex in batch for lp in ex.old_logprobs], dtype=torch.float64)
        packed = torch.empty(ids.numel() + logprobs.numel(), dtype=torch.int64, pin_memory=pin)
        packed[: ids.numel()] = ids
        packed[ids.numel() :] = logprobs.view(torch.int64)
        return cls(
            packed,
            spans,
            (start, start + len(response)),
            (ids.numel(), packed.numel()),
            [len(ex.response_ids) for ex in batch],
        )

    def upload(self, device: torch.device) -> torch.Tensor:
        return self.packed.to(device, non_blocking=True)


def _response_logits(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Logits predicting the last ``n`` tokens of ``ids`` (only those rows go through the head)."""
    # use_cache=False: a training forward never decodes further, so a KV cache is pure waste.
    logits: torch.Tensor = model(input_ids=ids.unsqueeze(0), logits_to_keep=n + 1, use_cache=False).logits[
        0, :-1
    ]
    return logits


def teacher_weights(model: Any, slot: LoraSlot, spec: TrainingSpec) -> AbstractContextManager[Any]:
    """The teacher's weights: the frozen base (the adapter switched off), or the base with the EMA
    of the adapter's weights (``teacher: ema``)."""
    return slot.teaching() if spec.teacher == "ema" else model.disable_adapter()


METRIC_NAMES = ("total_loss", "distill_loss", "kl_reg", "mean_is_ratio", "clip_fraction", "grad_norm")


def train_step(
    model: Any, slot: LoraSlot, spec: TrainingSpec, batch: Batch, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Forward, SDPO loss, backward, clip, AdamW. Raises NonFiniteLoss before any update.

    The batch goes up in one copy; the metrics come back in one read, which is also the one wait
    that decides whether the update may be applied (loss and gradient norm finite).
    """
    opt = slot.optimizer
    for group in opt.param_groups:
        group["lr"] = spec.learning_rate
    opt.zero_grad(set_to_none=True)
    try:
        values = _loss_and_gradients(model, slot, spec, batch, device, dtype)
    except BaseException:
        opt.zero_grad(set_to_none=True)
        raise
    metrics = dict(zip(METRIC_NAMES, values, strict=True))
    for name in ("total_loss", "grad_norm"):
        if not math.isfinite(metrics[name]):
            opt.zero_grad(set_to_none=True)
            what = "loss" if name == "total_loss" else "gradient norm"
            raise NonFiniteLoss(f"the {what} is {metrics[name]}; nothing was applied", field="samples")
    opt.step()
    opt.zero_grad(set_to_none=True)
    slot.stepped(spec.teacher_ema_rate)
    metrics["tokens_processed"] = float(sum(batch.response_lengths))
    metrics["batch_size"] = float(len(batch.response_lengths))
    return metrics


def _loss_and_gradients(
    model: Any, slot: LoraSlot, spec: TrainingSpec, batch: Batch, device: torch.device, dtype: torch.dtype
) -> list[float]:
    """Everything that builds the autograd graph, in a frame of its own: when it returns, the graph
    and its activations are gone, whatever the caller does with the numbers."""
    packed = batch.upload(device)
    # Autocast runs the forward in the base's dtype; LoRA weights, gradients and AdamW stay fp32.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    student, teacher, base = [], [], []
    model.eval()
    with autocast, torch.no_grad():
        with teacher_weights(model, slot, spec):
            for (s, e), n in zip(batch.spans["teacher"], batch.response_lengths, strict=True):
                teacher.append(_response_logits(model, packed[s:e], n))
        if spec.kl_reg_weight > 0.0:
            with model.disable_adapter():
                for (s, e), n in zip(batch.spans["student"], batch.response_lengths, strict=True):
                    base.append(_response_logits(model, packed[s:e], n))
    # Train mode only matters for LoRA dropout; the base model's own dropouts are 0.
    model.train(slot.lora.dropout > 0.0)
    try:
        with autocast:
            for (s, e), n in zip(batch.spans["student"], batch.response_lengths, strict=True):
                student.append(_response_logits(model, packed[s:e], n))
    finally:
        model.eval()
    terms = sdpo.sdpo_loss(
        torch.cat(student),
        torch.cat(teacher),
        packed[batch.response[0] : batch.response[1]],
        packed[batch.logprobs[0] : batch.logprobs[1]].view(torch.float64),
        alpha=spec.alpha,
        is_clip=spec.is_clip,
        is_floor=spec.is_floor,
        top_k=spec.teacher_top_k,
        kl_reg_weight=spec.kl_reg_weight,
        base_logits=torch.cat(base) if base else None,
    )
    terms.total.backward()
    params = [slot.params[k] for k in slot.keys]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
    out = torch.stack(
        [
            terms.total.detach(),
            terms.distill.detach(),
            terms.kl_reg.detach(),
            terms.mean_is_ratio,
            terms.clip_fraction,
            grad_norm.to(terms.total.dtype),
        ]
    )
    values: list[float] = out.tolist()  # the step's one read from the device
    return values
