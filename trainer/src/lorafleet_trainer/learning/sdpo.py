"""The SDPO loss (self-distillation with feedback), as pure tensor math.

At every response position the student (base + LoRA, prompted without the feedback) is pulled
towards the teacher (the frozen base, prompted with the feedback) by a divergence over the
teacher's top-K tokens plus one "tail" bucket holding the remaining mass, so both sides are proper
distributions and mass the student puts outside the teacher's top-K is still penalised. With
alpha 0 it is the forward KL(teacher || student), whose pull on a token's logit is the teacher's
probability minus the student's: it raises tokens the student gives almost no mass. With alpha 0.5
(the generalized Jensen-Shannon divergence) that pull scales with the student's own probability,
so such tokens barely move. Each position is weighted by the importance ratio between the current
student and the policy that sampled the response (clipped to ``[is_floor, is_clip]``), and a k3
estimate of KL(student || base) on the sampled tokens regularises drift. Everything is averaged
over response tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Tail mass below this is treated as zero mass (its log is clamped) to keep gradients finite.
_TAIL_FLOOR = 1e-12


def kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Divergence between student S and teacher T, per position (last dim = support).

    alpha = 0 gives the forward KL(T || S), alpha = 1 the reverse KL(S || T); in between it is the
    alpha-skewed Jensen-Shannon divergence with mixture M = alpha*T + (1-alpha)*S:
    alpha*KL(T || M) + (1-alpha)*KL(S || M).
    """
    if alpha <= 0.0:
        return kl(teacher_logp, student_logp)
    if alpha >= 1.0:
        return kl(student_logp, teacher_logp)
    mixture = torch.logsumexp(
        torch.stack([teacher_logp + math.log(alpha), student_logp + math.log(1.0 - alpha)]), dim=0
    )
    return alpha * kl(teacher_logp, mixture) + (1.0 - alpha) * kl(student_logp, mixture)


def _with_tail(selected_logp: Tensor) -> Tensor:
    """Append log(1 - sum(p)) of the unselected tokens as one more category."""
    tail = (-torch.expm1(torch.logsumexp(selected_logp, dim=-1, keepdim=True))).clamp_min(_TAIL_FLOOR)
    return torch.cat([selected_logp, tail.log()], dim=-1)


def top_k_support(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs on the teacher's top-``k`` tokens plus a tail bucket.

    With ``k`` at least the vocabulary size the full distributions are returned unchanged.
    """
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    if k >= teacher_logp.shape[-1]:
        return student_logp, teacher_logp
    teacher_top, index = teacher_logp.topk(k, dim=-1)
    student_top = student_logp.gather(-1, index)
    return _with_tail(student_top), _with_tail(teacher_top)


def k3(student_token_logp: Tensor, base_token_logp: Tensor) -> Tensor:
    """The k3 estimator of KL(student || base) from sampled tokens: r - 1 - log r, r = base/student."""
    log_ratio = base_token_logp - student_token_logp
    return log_ratio.exp() - 1.0 - log_ratio


@dataclass(frozen=True)
class LossTerms:
    total: Tensor
    distill: Tensor
    kl_reg: Tensor
    mean_is_ratio: Tensor  # 0-dim, left on the device: the caller reads every figure at once
    clip_fraction: Tensor
    tokens: int


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum()


def sdpo_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_ids: Tensor,
    old_logprobs: Tensor,
    *,
    alpha: float,
    is_clip: float,
    top_k: int,
    is_floor: float = 0.0,
    kl_reg_weight: float = 0.0,
    base_logits: Tensor | None = None,
    mask: Tensor | None = None,
) -> LossTerms:
    """The SDPO loss over response positions.

    ``student_logits``/``teacher_logits``/``base_logits``: ``[..., V]``, the logits that predict
    each response token; ``response_ids``/``old_logprobs``/``mask``: ``[...]``. Gradients flow only
    through ``student_logits``.
    """
    teacher_logits = teacher_logits.detach()
    if mask is None:
        tokens = old_logprobs.numel()  # known on the host: no read from the device
        mask = torch.ones_like(old_logprobs, dtype=torch.float32)
    else:
        mask = mask.float()
        tokens = int(mask.sum())
    if tokens <= 0:
        raise ValueError("the mask selects no response token")
    student_logp_full = torch.log_softmax(student_logits.float(), dim=-1)
    student_token_logp = student_logp_full.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)

    s_support, t_support = top_k_support(student_logits, teacher_logits, top_k)
    divergence = generalized_jsd(s_support, t_support, alpha)

    ratio = (student_token_logp.detach() - old_logprobs.float()).exp()
    # The ratio is exactly 1 on a rollout of the current version; on an older rollout it falls
    # where the student moved away, and ``is_floor`` keeps those tokens from being weighted away.
    weight = ratio.clamp(min=is_floor, max=is_clip)
    distill = _masked_mean(weight * divergence, mask)

    if kl_reg_weight > 0.0:
        if base_logits is None:
            raise ValueError("kl_reg_weight > 0 needs base_logits")
        base_logp = torch.log_softmax(base_logits.detach().float(), dim=-1)
        base_token_logp = base_logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        kl_reg = _masked_mean(k3(student_token_logp, base_token_logp), mask)
    else:
        kl_reg = torch.zeros((), dtype=distill.dtype, device=distill.device)
    return LossTerms(
        total=distill + kl_reg_weight * kl_reg,
        distill=distill,
        kl_reg=kl_reg,
        mean_is_ratio=_masked_mean(ratio, mask),
        clip_fraction=_masked_mean((ratio > is_clip).float(), mask),
        tokens=tokens,
    )
