"""Idempotency keys: a retried step is answered again, never applied twice, also after a restart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.trainer.engine_helpers import samples, stored_state

from lorafleet_api.wire import KEYED_STEPS_KEPT
from lorafleet_trainer.engine.storage import AdapterMeta
from lorafleet_trainer.errors import ConfigConflict
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.results import KeyedStep, StepKey

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
A = AdapterId("team-a", "keyed")


def test_a_retry_is_answered_again_across_a_restart_and_another_body_is_refused(
    make_engine: Callable[..., Any],
) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    key = StepKey("feedback-7", "digest-of-the-body")
    first = engine.distill(A, samples(1), None, key)
    assert (first.version, first.replayed) == (1, False)
    after_first = stored_state(engine.store, A)

    again = engine.distill(A, samples(1), None, key)
    assert again.replayed and (again.version, again.artifact) == (1, first.artifact)
    assert again.metrics == first.metrics and again.cache_hit == first.cache_hit
    with pytest.raises(ConfigConflict) as refused:
        engine.distill(A, samples(2), None, StepKey("feedback-7", "digest-of-another-body"))
    assert refused.value.field == "idempotency_key"
    assert engine.get_adapter(A).version == 1
    assert stored_state(engine.store, A)["step"] == after_first["step"]

    # An unkeyed step and a step with a new key each apply.
    assert engine.distill(A, samples(3)).version == 2
    assert engine.distill(A, samples(4), None, StepKey("feedback-8", "d")).version == 3

    # A new process over the same storage (a trainer restarted, or the adapter placed elsewhere)
    # reads the keys committed with the versions.
    restarted = make_engine()
    replay = restarted.distill(A, samples(1), None, key)
    assert replay.replayed and replay.version == 1 and replay.metrics == first.metrics
    assert restarted.get_adapter(A).version == 3
    assert restarted.distill(A, samples(4), None, StepKey("feedback-8", "d")).version == 3

    # A new epoch (a metadata-only write) keeps the keys.
    restarted.init_adapter(A, LORA, 2)
    assert restarted.distill(A, samples(1), None, key).replayed


def test_only_the_latest_keys_are_kept() -> None:
    meta = AdapterMeta(A, 0, 0, LORA, TrainingSpec(), "builtin:tiny")
    for version in range(1, KEYED_STEPS_KEPT + 3):
        step = KeyedStep(StepKey(f"k{version}", "d"), version, f".keyed.v{version}", False, {"loss": 1.0})
        meta = AdapterMeta(
            A, version, 0, LORA, TrainingSpec(), "builtin:tiny", meta.with_keyed(step, KEYED_STEPS_KEPT)
        )
    assert len(meta.keyed) == KEYED_STEPS_KEPT
    assert meta.keyed_step("k1") is None and meta.keyed_step("k2") is None
    assert meta.keyed_step(f"k{KEYED_STEPS_KEPT + 2}") is not None
    assert AdapterMeta.from_json(meta.to_json()) == meta
