"""Reading a model without training it: token log-probabilities and the teacher's preview.

``token_logprobs`` scores a given answer (what a step would recompute as the student's logprob).
``compare`` puts the teacher (the frozen base reading the feedback) and the student side by side
at the first positions of the teacher's greedy answer: each side's most likely tokens there, and
how much mass the student gives the token the teacher chose. A user sees from it, before any
step, whether the teacher would follow the feedback at all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer.results import PositionTop, TopToken


@dataclass(frozen=True)
class Answering:
    """A model ready to answer as one adapter version (see ``TrainerEngine._answering``)."""

    model: Any
    version: int | None
    cache_hit: bool | None
    restore_ms: float
    slot: Any  # the adapter's LoraSlot (None: the bare base model answers)


def _answer_logits(
    model: Any, prompt_ids: list[int], answer_ids: list[int], device: torch.device
) -> torch.Tensor:
    """Logits predicting each of ``answer_ids`` after ``prompt_ids``: ``[len(answer_ids), V]``."""
    ids = torch.tensor([prompt_ids + answer_ids], dtype=torch.long, device=device)
    n = len(answer_ids)
    logits: torch.Tensor = model(input_ids=ids, logits_to_keep=n + 1, use_cache=False).logits[0, :-1]
    return logits.float()


def token_logprobs(
    model: Any, prompt_ids: list[int], answer_ids: list[int], device: torch.device
) -> list[float]:
    logp = torch.log_softmax(_answer_logits(model, prompt_ids, answer_ids, device), dim=-1)
    index = torch.tensor(answer_ids, dtype=torch.long, device=logp.device).unsqueeze(-1)
    values: list[float] = logp.gather(-1, index).squeeze(-1).cpu().tolist()
    return values


def _top(tokenizer: Any, probs: torch.Tensor, k: int) -> list[TopToken]:
    values, ids = probs.topk(k)
    return [
        TopToken(int(i), tokenizer.decode([int(i)]), float(p))
        for p, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def compare(
    model: Any,
    teacher: Callable[[], AbstractContextManager[Any]],
    tokenizer: Any,
    student_ids: list[int],
    teacher_ids: list[int],
    answer_ids: list[int],
    top: int,
    device: torch.device,
    positions: int = 3,
) -> list[PositionTop]:
    """Top tokens of teacher and student at the first ``positions`` tokens of the teacher's answer."""
    answer = answer_ids[:positions]
    if not answer:
        return []
    student = torch.softmax(_answer_logits(model, student_ids, answer, device), dim=-1).cpu()
    with teacher():
        teacher_p = torch.softmax(_answer_logits(model, teacher_ids, answer, device), dim=-1).cpu()
    k = min(top, student.shape[-1])
    return [
        PositionTop(
            token=TopToken(tok, tokenizer.decode([tok]), float(teacher_p[i, tok])),
            student_prob=float(student[i, tok]),
            teacher=_top(tokenizer, teacher_p[i], k),
            student=_top(tokenizer, student[i], k),
        )
        for i, tok in enumerate(answer)
    ]
