"""Fused steps across adapters (``distill_many``): the same updates as the steps run one after
another, each adapter failing or succeeding on its own, each adapter's order kept, the cache
counted per adapter. Real models (builtin:tiny, float32 on the CPU), no timing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from tests.trainer.engine_helpers import max_diff, sample_dict, stored_state

from lorafleet_trainer.engine import fusing
from lorafleet_trainer.errors import InvalidInput, NonFiniteLoss
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample
from lorafleet_trainer.results import StepKey, StepRequest, StepResult

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
OTHER = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
A, B, C, D = (AdapterId("team", name) for name in ("alice", "bob", "carol", "dave"))
# Each adapter its own settings: the plain forward KL; JSD with the KL to the base; the EMA teacher.
# Learning rates are 0.5-2x the default (1e-4). AdamW's normalisation (m / (sqrt(v) + eps)) turns
# float32 summation-order noise in a gradient near zero (about 1e-10, where v is about 1e-18) into
# a weight change of up to lr * noise / eps per step: the paths' summation orders differ (one
# forward for all rows against one per adapter), so the weights can agree only to about lr * 1e-2.
# At 5e-4 that was 1.3e-5 for B on one CPU and under 1e-5 on another; at these rates the worst
# is 4e-6 (B, whose JSD and KL terms have the noisiest gradients, at 1e-4) and 6e-7 at 5e-5.
SPECS = {
    A: TrainingSpec(learning_rate=2e-4, teacher_top_k=16),
    B: TrainingSpec(learning_rate=5e-5, teacher_top_k=16, alpha=0.5, kl_reg_weight=0.1, max_grad_norm=0.5),
    C: TrainingSpec(learning_rate=2e-4, teacher_top_k=8, teacher="ema", teacher_ema_rate=0.5),
    D: TrainingSpec(learning_rate=1e-4, teacher_top_k=16),
}
# (prompt, response) lengths per sample: different counts and lengths per adapter, so rows are padded.
SHAPES = {A: [(6, 5)], B: [(14, 3), (3, 9), (9, 7)], C: [(20, 4), (5, 6)], D: [(4, 4), (8, 2)]}
# As many samples per adapter (the multi-LoRA layer's batched-matmul form), still padded.
EVEN = {A: [(6, 5), (2, 3)], B: [(14, 3), (3, 9)], C: [(20, 4), (5, 6)], D: [(4, 4), (8, 2)]}
TOLERANCE = 1e-5


def batch(
    adapter: AdapterId,
    round_: int,
    bad: bool = False,
    shapes: dict[AdapterId, list[tuple[int, int]]] = SHAPES,
) -> list[DistillSample]:
    seed = 1000 * round_ + 100 * sorted(shapes).index(adapter)
    out = []
    for i, (p, r) in enumerate(shapes[adapter]):
        d = sample_dict(seed + i, prompt_len=p, response_len=r)
        if bad and i == len(shapes[adapter]) - 1:
            d["response_token_ids"] = [*d["response_token_ids"][:-1], 1 << 20]  # outside the vocabulary
        out.append(DistillSample.from_dict(d))
    return out


def engines(make_engine: Callable[..., Any], adapters: Sequence[AdapterId], **kw: Any) -> tuple[Any, Any]:
    """A sequential and a fused engine with the same adapters, each trained once already (B moves
    off zero, so every gradient is live), except the last adapter, which starts fresh."""
    pair = (make_engine(root="sequential", **kw), make_engine(root="fused", **kw))
    for engine in pair:
        for adapter in adapters:
            engine.init_adapter(adapter, LORA, 1, SPECS[adapter])
        for adapter in adapters[:-1]:
            engine.distill(adapter, batch(adapter, 0))
    return pair


def assert_same_state(one: Any, other: Any, adapters: Sequence[AdapterId]) -> None:
    for adapter in adapters:
        a, b = stored_state(one.store, adapter), stored_state(other.store, adapter)
        assert int(a["step"][0]) == int(b["step"][0])
        # weights (w.), both AdamW moments (m., v.) and the EMA (e.), one key at a time
        assert max_diff(a, b) < TOLERANCE, (adapter, max_diff(a, b))
        # The moments are far below 1 (v about 1e-10): compared to their own scale too. B's JSD and
        # KL terms put the float32 noise floor near 1e-4 of the scale: the existing per-sample and
        # batched paths differ by 1.2e-4 there.
        for section in ("m.", "v."):
            keys = [k for k in a if k.startswith(section)]
            scale = max(float(a[k].abs().max()) for k in keys)
            worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
            assert scale > 0 and worst <= 1e-3 * scale, (adapter, section, worst, scale)
        assert one.get_adapter(adapter).version == other.get_adapter(adapter).version


def ok(outcome: StepResult | Exception) -> StepResult:
    assert isinstance(outcome, StepResult), outcome
    return outcome


@pytest.mark.parametrize(
    "budget, shapes",
    [(16384, SHAPES), (40, SHAPES), (16384, EVEN)],
    ids=["one-forward", "micro-batches", "even-lanes"],
)
def test_fused_steps_equal_the_same_steps_one_after_another(
    make_engine: Callable[..., Any], budget: int, shapes: dict[AdapterId, list[tuple[int, int]]]
) -> None:
    adapters = [A, B, C, D]
    sequential, fused = engines(make_engine, adapters, step_token_budget=budget)
    for round_ in (1, 2):  # the second round starts from lanes that already hold the adapters
        alone = [sequential.distill(adapter, batch(adapter, round_, shapes=shapes)) for adapter in adapters]
        together = [
            ok(o)
            for o in fused.distill_many([StepRequest(x, batch(x, round_, shapes=shapes)) for x in adapters])
        ]
        for one, other in zip(alone, together, strict=True):
            assert one.version == other.version
            assert one.metrics.keys() == other.metrics.keys()
            for name, value in one.metrics.items():
                assert abs(value - other.metrics[name]) < TOLERANCE, (name, value, other.metrics[name])
        assert_same_state(sequential, fused, adapters)
    # The comparison is not vacuous: the adapters' weights differ from each other and moved.
    state = {x: stored_state(fused.store, x) for x in adapters}
    assert max_diff(state[A], state[D]) > 1e-4
    assert fused.stats().tokens == sequential.stats().tokens


def test_a_bad_sample_fails_only_its_adapter(make_engine: Callable[..., Any]) -> None:
    sequential, fused = engines(make_engine, [A, B, C])
    before = fused.get_adapter(B).version
    outcomes = fused.distill_many([StepRequest(x, batch(x, 1, bad=x == B)) for x in (A, B, C)])
    assert isinstance(outcomes[1], InvalidInput) and "vocabulary" in str(outcomes[1])
    assert fused.get_adapter(B).version == before
    for adapter in (A, C):
        sequential.distill(adapter, batch(adapter, 1))
    assert_same_state(sequential, fused, [A, B, C])
    assert fused.stats().steps_failed == 1 and fused.stats().steps_ok == 2 + 2  # + the warm-up steps


def test_a_non_finite_loss_fails_only_its_adapter(make_engine: Callable[..., Any]) -> None:
    sequential, fused = engines(make_engine, [A, B, C, D])
    before = stored_state(fused.store, B)
    # B's cached state (what its restore reads) gets a non-finite LoRA weight: its rows' logits and
    # loss are not finite; the other rows in the same forward must not notice.
    entry = fused.cache.peek(B)
    assert entry is not None and entry.version == fused.get_adapter(B).version
    key = next(k for k in entry.layout.keys if ".lora_B." in k)
    entry.weights[key].fill_(float("inf"))
    outcomes = fused.distill_many([StepRequest(x, batch(x, 1)) for x in (A, B, C, D)])
    assert isinstance(outcomes[1], NonFiniteLoss)
    assert [ok(o).version for i, o in enumerate(outcomes) if i != 1] == [2, 2, 1]
    assert fused.get_adapter(B).version == 1
    assert max_diff(stored_state(fused.store, B), before) == 0.0  # nothing of B was committed
    for adapter in (A, C, D):
        sequential.distill(adapter, batch(adapter, 1))
    assert_same_state(sequential, fused, [A, C, D])


def test_two_steps_of_one_adapter_run_in_order_never_together(make_engine: Callable[..., Any]) -> None:
    assert fusing.waves([A, B, A, C, A, B]) == [[0, 1, 3], [2, 5], [4]]
    sequential, fused = engines(make_engine, [A, B, C])
    order = [(A, 1), (B, 1), (A, 2), (C, 1), (A, 3)]
    alone = [sequential.distill(x, batch(x, r)) for x, r in order]
    together = fused.distill_many([StepRequest(x, batch(x, r)) for x, r in order])
    assert [ok(o).version for o in together] == [r.version for r in alone] == [2, 2, 3, 1, 4]
    for one, other in zip(alone, together, strict=True):
        assert abs(one.metrics["total_loss"] - ok(other).metrics["total_loss"]) < TOLERANCE
    assert_same_state(sequential, fused, [A, B, C])


def test_the_bounds_split_a_fused_step_and_shapes_never_mix(make_engine: Callable[..., Any]) -> None:
    assert fusing.chunks([3, 1, 2, 5, 1], lambda n: n, lambda n: n, 2, 4, 100) == [[3, 1], [2], [5], [1]]
    sequential, fused = engines(make_engine, [A, B, C, D], fuse_max_adapters=2, fuse_max_rows=4)
    for engine in (sequential, fused):
        engine.init_adapter(AdapterId("team", "other-shape"), OTHER, 1)
    other = AdapterId("team", "other-shape")
    requests = [StepRequest(x, batch(x, 1)) for x in (A, B, C, D)]
    requests.insert(2, StepRequest(other, batch(A, 1)))
    for r in requests:
        sequential.distill(r.adapter, r.samples)
    assert all(isinstance(o, StepResult) for o in fused.distill_many(requests))
    assert_same_state(sequential, fused, [A, B, C, D, other])


def test_cache_hits_and_misses_count_per_adapter(make_engine: Callable[..., Any]) -> None:
    _, fused = engines(make_engine, [A, B, C, D])  # D never stepped: not in the cache
    assert fused.evict(B) is True
    stats = fused.stats()
    outcomes = [ok(o) for o in fused.distill_many([StepRequest(x, batch(x, 1)) for x in (A, B, C)])]
    assert [o.cache_hit for o in outcomes] == [True, False, True]
    assert outcomes[1].storage_read_bytes > 0 and outcomes[0].storage_read_bytes == 0
    after = fused.stats()
    assert (after.cache_hits - stats.cache_hits, after.cache_misses - stats.cache_misses) == (2, 1)
    assert after.steps_ok - stats.steps_ok == 3
    # Without a cache every adapter is read from storage, each counted.
    uncached = make_engine(capacity=0, root="uncached")
    for x in (A, B):
        uncached.init_adapter(x, LORA, 1, SPECS[x])
    outcomes = [ok(o) for o in uncached.distill_many([StepRequest(x, batch(x, 1)) for x in (A, B)])]
    assert [o.cache_hit for o in outcomes] == [False, False] and uncached.stats().cache_misses == 2


def test_async_durability_commits_each_fused_adapter(make_engine: Callable[..., Any]) -> None:
    sequential, fused = engines(make_engine, [A, B, C], durability="async")
    for x in (A, B, C):
        sequential.distill(x, batch(x, 1))
    outcomes = [ok(o) for o in fused.distill_many([StepRequest(x, batch(x, 1)) for x in (A, B, C)])]
    assert [o.version for o in outcomes] == [2, 2, 1]
    assert fused.flush(30.0) and sequential.flush(30.0)
    assert_same_state(sequential, fused, [A, B, C])
    fused.close(30.0)
    sequential.close(30.0)


def test_a_retried_key_is_answered_again_not_applied_twice(make_engine: Callable[..., Any]) -> None:
    _, fused = engines(make_engine, [A, B])
    keyed = [StepRequest(x, batch(x, 1), key=StepKey(f"k-{x.name}", "digest")) for x in (A, B)]
    first = [ok(o) for o in fused.distill_many(keyed)]
    ok_before = fused.stats().steps_ok
    again = [ok(o) for o in fused.distill_many(keyed)]
    assert [o.replayed for o in again] == [True, True]
    assert [o.version for o in again] == [o.version for o in first] == [2, 1]
    assert fused.stats().steps_ok == ok_before  # a replay is not a step
    assert [fused.get_adapter(x).version for x in (A, B)] == [2, 1]
