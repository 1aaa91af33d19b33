"""The SDPO loss against values worked out by hand on three- and four-token vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from lorafleet_trainer.learning import sdpo

T = [0.5, 0.3, 0.2]  # teacher
S = [0.25, 0.25, 0.5]  # student


def _logits(p: list[float]) -> torch.Tensor:
    # log-probabilities are valid logits; softmax gives p back.
    return torch.tensor([math.log(x) for x in p], dtype=torch.float64)


def test_endpoints_are_forward_and_reverse_kl() -> None:
    s, t = _logits(S), _logits(T)
    # KL(S||T) = .25 ln(.25/.5) + .25 ln(.25/.3) + .5 ln(.5/.2)
    reverse = 0.25 * math.log(0.5) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(2.5)
    # KL(T||S) = .5 ln(.5/.25) + .3 ln(.3/.25) + .2 ln(.2/.5)
    forward = 0.5 * math.log(2.0) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    assert reverse == pytest.approx(0.2392782, abs=1e-6)
    assert forward == pytest.approx(0.2180121, abs=1e-6)
    assert float(sdpo.generalized_jsd(s, t, 1.0)) == pytest.approx(reverse, abs=1e-9)
    assert float(sdpo.generalized_jsd(s, t, 0.0)) == pytest.approx(forward, abs=1e-9)


def test_half_alpha_is_jensen_shannon() -> None:
    # M = (T+S)/2 = [.375, .275, .35]
    kl_tm = 0.5 * math.log(0.5 / 0.375) + 0.3 * math.log(0.3 / 0.275) + 0.2 * math.log(0.2 / 0.35)
    kl_sm = 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.275) + 0.5 * math.log(0.5 / 0.35)
    expected = 0.5 * kl_tm + 0.5 * kl_sm
    assert expected == pytest.approx(0.0555825, abs=1e-6)
    got = sdpo.generalized_jsd(_logits(S), _logits(T), 0.5)
    assert float(got) == pytest.approx(expected, abs=1e-9)
    # Skewed: M = .25 T + .75 S = [.3125, .2625, .425]
    m = [0.25 * a + 0.75 * b for a, b in zip(T, S, strict=True)]
    skew = 0.25 * sum(a * math.log(a / c) for a, c in zip(T, m, strict=True)) + 0.75 * sum(
        b * math.log(b / c) for b, c in zip(S, m, strict=True)
    )
    assert float(sdpo.generalized_jsd(_logits(S), _logits(T), 0.25)) == pytest.approx(skew, abs=1e-9)


def test_top_k_keeps_tail_mass() -> None:
    teacher = _logits([0.4, 0.3, 0.2, 0.1])
    student = _logits([0.1, 0.2, 0.3, 0.4])
    s, t = sdpo.top_k_support(student, teacher, 2)
    assert t.exp().tolist() == pytest.approx([0.4, 0.3, 0.3], abs=1e-6)
    assert s.exp().tolist() == pytest.approx([0.1, 0.2, 0.7], abs=1e-6)
    full_s, full_t = sdpo.top_k_support(student, teacher, 10)
    assert full_t.exp().tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-6)
    assert full_s.shape == (4,)


def test_k3() -> None:
    # student p(y)=.25, base p(y)=.5: r = 2, k3 = 2 - 1 - ln 2
    got = sdpo.k3(torch.tensor(math.log(0.25)), torch.tensor(math.log(0.5)))
    assert float(got) == pytest.approx(1.0 - math.log(2.0), abs=1e-6)
    assert float(sdpo.k3(torch.tensor(-1.0), torch.tensor(-1.0))) == 0.0


def test_loss_weights_clips_and_masks() -> None:
    student = torch.stack([_logits(S), _logits(T), _logits(S)]).float().requires_grad_(True)
    teacher = torch.stack([_logits(T), _logits(S), _logits(T)]).float()
    response = torch.tensor([2, 0, 1])
    # Student token log-probs: ln .5, ln .5, ln .25; old log-probs make ratios 2, .5, 8.
    old = torch.tensor([math.log(0.25), math.log(1.0), math.log(0.25 / 8)])
    mask = torch.tensor([1.0, 1.0, 0.0])
    terms = sdpo.sdpo_loss(student, teacher, response, old, alpha=1.0, is_clip=1.5, top_k=100, mask=mask)
    d1 = 0.2392782  # KL(S||T)
    d2 = 0.2180121  # KL(T||S): the roles are swapped at position 2
    assert float(terms.distill.detach()) == pytest.approx((1.5 * d1 + 0.5 * d2) / 2, abs=1e-5)
    assert float(terms.mean_is_ratio) == pytest.approx(1.25, abs=1e-5)
    assert float(terms.clip_fraction) == pytest.approx(0.5)
    assert terms.tokens == 2
    assert float(terms.kl_reg) == 0.0 and float(terms.total.detach()) == float(terms.distill.detach())
    terms.total.backward()
    assert student.grad is not None
    assert torch.all(student.grad[2] == 0)  # masked position gets no gradient
    assert student.grad[0].abs().sum() > 0


def test_kl_regularizer_adds_weighted_k3() -> None:
    student = _logits(S).float().unsqueeze(0)
    base = _logits(T).float().unsqueeze(0)
    response = torch.tensor([0])  # student .25, base .5 -> k3 = 1 - ln 2
    terms = sdpo.sdpo_loss(
        student,
        student,
        response,
        torch.tensor([math.log(0.25)]),
        alpha=0.5,
        is_clip=5.0,
        top_k=2,
        kl_reg_weight=0.1,
        base_logits=base,
    )
    assert float(terms.distill.detach()) == pytest.approx(0.0, abs=1e-7)  # teacher == student
    assert float(terms.kl_reg) == pytest.approx(1.0 - math.log(2.0), abs=1e-6)
    assert float(terms.total.detach()) == pytest.approx(0.1 * (1.0 - math.log(2.0)), abs=1e-6)
    with pytest.raises(ValueError):
        sdpo.sdpo_loss(
            student,
            student,
            response,
            torch.tensor([-1.0]),
            alpha=0.5,
            is_clip=5.0,
            top_k=2,
            kl_reg_weight=0.1,
        )


def test_floor_bounds_the_importance_weight_from_below() -> None:
    student = torch.stack([_logits(S), _logits(T)]).float()
    teacher = torch.stack([_logits(T), _logits(S)]).float()
    response = torch.tensor([2, 0])  # student token probs .5 and .5
    old = torch.tensor([math.log(1.0), math.log(0.125)])  # ratios .5 and 4
    d1, d2 = 0.2392782, 0.2180121  # KL(S||T) at position 1, KL(T||S) at position 2 (alpha 1)
    kw: dict[str, float | int] = {"alpha": 1.0, "is_clip": 5.0, "top_k": 100}
    plain = sdpo.sdpo_loss(student, teacher, response, old, **kw)  # type: ignore[arg-type]
    floored = sdpo.sdpo_loss(student, teacher, response, old, is_floor=0.8, **kw)  # type: ignore[arg-type]
    assert float(plain.distill) == pytest.approx((0.5 * d1 + 4 * d2) / 2, abs=1e-5)
    assert float(floored.distill) == pytest.approx((0.8 * d1 + 4 * d2) / 2, abs=1e-5)
    # The ratio itself is reported unchanged: the floor bounds the weight only.
    assert float(floored.mean_is_ratio) == pytest.approx(2.25, abs=1e-5)


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, 0.13 - 2.5e-4), (0.5, None), (1.0, None)])
def test_forward_kl_pulls_a_token_the_student_gives_no_mass(alpha: float, expected: float | None) -> None:
    """The logit pull on a token the teacher likes (0.13) and the student does not (2.5e-4): under the
    forward KL it is the difference of the probabilities; under JSD or the reverse KL it scales with
    the student's own probability, so the token barely moves."""
    p_s = [2.5e-4, 1 - 2.5e-4 - 0.1, 0.1]
    p_t = [0.13, 0.77, 0.1]
    student = _logits(p_s).float().requires_grad_(True)
    sdpo.generalized_jsd(
        torch.log_softmax(student, -1), torch.log_softmax(_logits(p_t).float(), -1), alpha
    ).backward()
    assert student.grad is not None
    pull = -float(student.grad[0])
    if expected is not None:
        assert pull == pytest.approx(expected, rel=1e-3)
    else:
        assert 0 < pull < 0.01  # orders of magnitude weaker than the forward KL's 0.13
