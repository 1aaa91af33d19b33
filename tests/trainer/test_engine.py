"""The engine's adapter lifecycle, validation, one-time load, slot reuse, and failure atomicity."""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.trainer.engine_helpers import max_diff, sample_dict, samples, stored_state

from lorafleet_trainer.engine import stepping
from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
from lorafleet_trainer.errors import (
    AdapterNotFound,
    ConfigConflict,
    InvalidInput,
    NonFiniteLoss,
    NotReady,
    StorageFull,
)
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning import sampling
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample
from lorafleet_trainer.models import models

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
A, B = AdapterId("team-a", "alice"), AdapterId("team-a", "bob")


@pytest.fixture(scope="module")
def engine(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerEngine:
    config = EngineConfig(
        storage_root=tmp_path_factory.mktemp("engine-store"),
        cache_capacity_bytes=1 << 30,
        device="cpu",
        model_cache_dir=model_cache_dir,
        default_training=TrainingSpec(learning_rate=1e-2, teacher_top_k=16),
    )
    engine = TrainerEngine(config)
    threads = [threading.Thread(target=engine.load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return engine


def test_load_happens_once_under_concurrent_calls(engine: TrainerEngine) -> None:
    assert engine.ready and engine.load_count == 1
    engine.load()
    assert engine.load_count == 1
    assert engine.vocab_size == models.BUILTINS["tiny"].vocab_size
    assert engine.device == torch.device("cpu")


def test_not_ready_before_load(tmp_path: Path, model_cache_dir: Path) -> None:
    cold = TrainerEngine(EngineConfig(storage_root=tmp_path, model_cache_dir=model_cache_dir, device="cpu"))
    assert not cold.ready
    with pytest.raises(NotReady):
        cold.init_adapter(A, LORA, 1)
    with pytest.raises(NotReady):
        cold.distill(A, samples(0))


def test_config_validation() -> None:
    with pytest.raises(InvalidInput) as err:
        EngineConfig(storage_root=Path("/tmp/x"), device="tpu")
    assert err.value.field == "device"
    with pytest.raises(InvalidInput) as err:
        EngineConfig(storage_root=Path("/tmp/x"), gpu_residency="sometimes")
    assert err.value.field == "gpu_residency"


def test_init_create_same_conflict_and_epochs(engine: TrainerEngine) -> None:
    adapter = AdapterId("init", "one")
    created = engine.init_adapter(adapter, LORA, 1, TrainingSpec(alpha=1.0))
    assert created.created and created.state.version == 0 and created.state.epoch == 1
    state = created.state
    assert (state.adapter, state.version, state.epoch, state.lora) == (adapter, 0, 1, LORA)
    assert (state.cached, state.cache_bytes) == (False, 0)
    assert state.artifact.startswith("init/.one.v00000000-")  # version 0's own directory
    again = engine.init_adapter(adapter, LORA, 1)
    assert not again.created and again.state.training.alpha == 1.0  # stored defaults kept
    with pytest.raises(ConfigConflict) as err:
        engine.init_adapter(adapter, LoraSpec(rank=8), 1)
    assert err.value.field == "lora"
    with pytest.raises(ConfigConflict) as err:
        engine.init_adapter(adapter, LORA, 0)
    assert err.value.field == "epoch"
    assert engine.init_adapter(adapter, LORA, 4).state.epoch == 4
    with pytest.raises(InvalidInput) as err:
        engine.init_adapter(AdapterId("init", "two"), LoraSpec(target_modules=("q_proj", "nope")), 1)
    assert err.value.field == "lora.target_modules[1]" and "'nope'" in err.value.message
    reordered = LoraSpec(rank=4, alpha=8.0, target_modules=("v_proj", "q_proj"))
    assert not engine.init_adapter(adapter, reordered, 4).created  # same modules, other order
    with pytest.raises(AdapterNotFound):
        engine.get_adapter(AdapterId("init", "two"))


def test_initial_weights_are_deterministic(engine: TrainerEngine, make_engine: Callable[..., Any]) -> None:
    adapter = AdapterId("det", "same")
    engine.init_adapter(adapter, LORA, 1)
    other = make_engine(root="other")
    other.init_adapter(adapter, LORA, 1)
    other.init_adapter(AdapterId("det", "different"), LORA, 1)
    assert max_diff(stored_state(engine.store, adapter), stored_state(other.store, adapter)) == 0.0
    a = stored_state(other.store, adapter)
    b = stored_state(other.store, AdapterId("det", "different"))
    assert max_diff(a, b) > 0.0


def test_unknown_adapter_and_bad_samples_change_nothing(engine: TrainerEngine) -> None:
    with pytest.raises(AdapterNotFound):
        engine.distill(AdapterId("none", "such"), samples(0))
    engine.init_adapter(B, LORA, 1)
    engine.distill(B, samples(0))
    before = stored_state(engine.store, B)
    reads, writes = engine.store.read_bytes, engine.store.written_bytes
    bad = [
        DistillSample.from_dict(sample_dict(1)),
        DistillSample.from_dict(sample_dict(2) | {"response_token_ids": [1, 2, 3, 4, 9999]}),
    ]
    with pytest.raises(InvalidInput) as err:
        engine.distill(B, bad)
    assert err.value.field == "samples[1].response_token_ids[4]"
    with pytest.raises(InvalidInput) as err:
        engine.distill(B, samples(1), {"alpha": 2})
    assert err.value.field == "training.alpha"
    with pytest.raises(InvalidInput) as err:
        engine.distill(B, [])
    assert err.value.field == "samples"
    assert engine.get_adapter(B).version == 1
    assert (engine.store.read_bytes, engine.store.written_bytes) == (reads, writes)
    assert max_diff(stored_state(engine.store, B), before) == 0.0


def test_slots_are_shared_per_shape_and_the_model_is_wrapped_once(engine: TrainerEngine) -> None:
    slots = engine._slots
    assert slots is not None
    peft_model = slots.peft_model
    n = len(slots)
    engine.init_adapter(AdapterId("shape", "one"), LORA, 1)
    engine.init_adapter(AdapterId("shape", "two"), LORA, 1)
    assert len(slots) == n
    wide = LoraSpec(rank=2, alpha=2.0, target_modules=("o_proj",))
    engine.init_adapter(AdapterId("shape", "wide"), wide, 1)
    step = engine.distill(AdapterId("shape", "wide"), samples(3))
    assert step.version == 1 and len(slots) == n + 1
    assert slots.peft_model is peft_model
    # Base weights stay frozen and untouched by all the training above.
    fresh, _ = models.load("builtin:tiny", engine.config.model_cache_dir)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad(), peft_model.disable_adapter():
        trained_base = peft_model(input_ids=ids).logits
    assert torch.allclose(trained_base, fresh(input_ids=ids).logits, atol=1e-6)
    assert not any(p.requires_grad for n_, p in peft_model.named_parameters() if "lora_" not in n_)


def test_metrics_of_a_step(engine: TrainerEngine) -> None:
    adapter = AdapterId("metrics", "one")
    engine.init_adapter(adapter, LORA, 1)
    step = engine.distill(adapter, samples(5, n=3), {"kl_reg_weight": 0.5, "teacher_top_k": 4})
    m = step.metrics
    assert set(m) == {
        "total_loss",
        "distill_loss",
        "kl_reg",
        "mean_is_ratio",
        "clip_fraction",
        "grad_norm",
        "tokens_processed",
        "batch_size",
    }
    assert m["batch_size"] == 3 and m["tokens_processed"] == 15
    assert m["distill_loss"] > 0 and m["grad_norm"] > 0
    assert m["kl_reg"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the identity
    assert m["total_loss"] == pytest.approx(m["distill_loss"] + 0.5 * m["kl_reg"], rel=1e-6)
    second = engine.distill(adapter, samples(6), {"kl_reg_weight": 0.5})
    assert second.metrics["kl_reg"] > 0  # now the adapter has moved away from the base
    assert not step.cache_hit and second.cache_hit


def test_failed_persist_leaves_cache_and_storage_at_previous_version(
    engine: TrainerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = AdapterId("fail", "persist")
    engine.init_adapter(adapter, LORA, 1)
    engine.distill(adapter, samples(0))
    stored = stored_state(engine.store, adapter)
    entry = engine.cache.peek(adapter)
    assert entry is not None
    cached = {k: t.clone() for k, t in entry.as_dict().items()}

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(engine.store, "_write_bytes", no_space)
        with pytest.raises(StorageFull):
            engine.distill(adapter, samples(1))
    state = engine.get_adapter(adapter)
    assert state.version == 1 and state.cached
    assert max_diff(stored_state(engine.store, adapter), stored) == 0.0
    assert max_diff(engine.cache.peek(adapter).as_dict(), cached) == 0.0  # type: ignore[union-attr]
    # The next step starts from version 1, as if the failed one never happened.
    assert engine.distill(adapter, samples(1)).version == 2
    assert engine.stats().steps_failed >= 1


def test_non_finite_loss_changes_nothing(engine: TrainerEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = AdapterId("fail", "nan")
    engine.init_adapter(adapter, LORA, 1)
    engine.distill(adapter, samples(0))
    stored = stored_state(engine.store, adapter)
    real = stepping.sdpo.sdpo_loss

    def nan_loss(*args: Any, **kwargs: Any) -> Any:
        terms = real(*args, **kwargs)
        return type(terms)(**{**terms.__dict__, "total": terms.total * float("nan")})

    with monkeypatch.context() as m:
        m.setattr(stepping.sdpo, "sdpo_loss", nan_loss)
        with pytest.raises(NonFiniteLoss):
            engine.distill(adapter, samples(1))
    assert engine.get_adapter(adapter).version == 1
    assert max_diff(stored_state(engine.store, adapter), stored) == 0.0
    entry = engine.cache.peek(adapter)
    assert entry is not None and max_diff(entry.as_dict(), stored) == 0.0


def test_crash_before_the_rename_keeps_the_old_version(
    engine: TrainerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = AdapterId("fail", "crash")
    engine.init_adapter(adapter, LORA, 1)
    engine.distill(adapter, samples(0))
    stored = stored_state(engine.store, adapter)

    def crash(adapter: AdapterId, aside: Path) -> None:
        raise KeyboardInterrupt  # the process is killed after writing aside, before the swap

    with monkeypatch.context() as m:
        m.setattr(engine.store, "_commit", crash)
        with pytest.raises(KeyboardInterrupt):
            engine.distill(adapter, samples(1))
    from lorafleet_trainer.engine.storage import AdapterStore

    after_restart = AdapterStore(engine.store.root)
    assert after_restart.read_meta(adapter).version == 1
    assert max_diff(stored_state(after_restart, adapter), stored) == 0.0
    assert after_restart.sweep(adapter) == 1
    assert engine.get_adapter(adapter).version == 1


def test_evict_delete_pin(engine: TrainerEngine) -> None:
    adapter = AdapterId("life", "cycle")
    with pytest.raises(AdapterNotFound):
        engine.pin(adapter)
    engine.init_adapter(adapter, LORA, 1)
    engine.pin(adapter)
    engine.distill(adapter, samples(0))
    assert engine.get_adapter(adapter).pinned
    deleted_before = engine.stats().evictions["deleted"]
    assert engine.delete(adapter) is True
    assert engine.delete(adapter) is False
    assert engine.stats().evictions["deleted"] == deleted_before + 1
    with pytest.raises(AdapterNotFound):
        engine.get_adapter(adapter)
    assert not engine.store.path(adapter).exists()
    # Re-created from scratch: version 0 again, deterministic initial weights.
    assert engine.init_adapter(adapter, LORA, 1).created


def test_the_ema_follows_the_weights_and_an_ema_teacher_reads_it(engine: TrainerEngine) -> None:
    """The EMA moves ``teacher_ema_rate`` of the way towards the weights after every step, whatever
    the teacher; with ``teacher: ema`` the teacher's logits differ from the frozen base's."""
    adapter = AdapterId("t", "ema")
    engine.init_adapter(
        adapter, LORA, 1, TrainingSpec(learning_rate=1e-2, teacher_top_k=16, teacher_ema_rate=0.5)
    )
    start = engine.store.read_tensors(adapter)
    assert torch.equal(start.section("e"), start.section("w"))
    engine.distill(adapter, samples(5, n=2))
    after = engine.store.read_tensors(adapter)
    moved = after.section("w") - start.section("w")
    assert moved.abs().max() > 0
    assert torch.allclose(after.section("e"), start.section("w") + 0.5 * moved, atol=1e-6)
    slots = engine._require_ready()
    slot = slots.slot_for(LORA)
    slots.activate(slot)
    slot.restore(after, reuse=False)
    weights_before = slot.state.section("w").clone()
    with slot.teaching():
        assert torch.equal(slot.state.section("w"), after.section("e"))
    assert torch.equal(slot.state.section("w"), weights_before)  # put back
    ema_step = engine.distill(adapter, samples(6, n=2), {"teacher": "ema"})
    assert ema_step.version == 2 and math.isfinite(ema_step.metrics["distill_loss"])


def test_score_gives_the_logprobs_generate_reported_and_names_a_bad_token(engine: TrainerEngine) -> None:
    prompt = sampling.Prompt(token_ids=(5, 9, 14, 3))
    answer = engine.generate(None, prompt, sampling.SamplingParams(max_tokens=6))
    scored = engine.score(None, prompt, answer.token_ids)
    assert scored.token_ids == answer.token_ids
    assert scored.logprobs == pytest.approx(answer.logprobs, abs=1e-4)
    with pytest.raises(InvalidInput) as err:
        engine.score(None, prompt, [answer.token_ids[0], engine.vocab_size + 3])
    assert err.value.field == "response_token_ids[1]"
    with pytest.raises(InvalidInput) as err:  # fits on its own, not after the prompt
        engine.score(None, prompt, [1] * (engine._max_positions - 2))
    assert err.value.field == "response"
