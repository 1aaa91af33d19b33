"""What a step leaves behind and what it moves: nothing after a failure, the minimum when it works.

On a GPU every ``copy_`` between host and device is a transfer and every read of a device value a
synchronisation. Counted on the CPU (``device_calls``), a warm step that swaps adapters makes four
such calls: the adapter state up (one copy of its bundle), the packed batch up, the state back down
(one copy), and two reads: the metrics (which decide whether the update may apply) and the weights'
finiteness (which also completes the copy down). transformers adds one read per forward of its own
(``FOREIGN_SYNC``). Before these figures were held by a test, the same
step made 183 copy calls and 75 reads (one per tensor, per sequence, per metric, and a KV cache).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.trainer.device_calls import counting
from tests.trainer.engine_helpers import samples

from lorafleet_trainer.engine import stepping
from lorafleet_trainer.errors import NonFiniteLoss
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec
from lorafleet_trainer.service.queueing import StepQueue

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
A, B = AdapterId("traffic", "alice"), AdapterId("traffic", "bob")

# Calls torch and transformers make inside a step that are not crossings on a GPU: AdamW reads
# its step count, a host scalar; clip_grad_norm_ and the rotary embedding move tensors to the
# device they are already on.
FOREIGN_NOT_CROSSINGS = ("optimizer.py", "clip_grad.py", "modeling_qwen2.py")
# One read that is a real synchronisation and not ours: transformers checks every forward without
# an attention mask or a cache for packed sequences (``(mask[:, -1] == 0).all()``). Passing a mask
# would trade it for another such check; it is counted so a change shows.
FOREIGN_SYNC = "masking_utils.py"
FORWARDS = 4  # two samples, each through the teacher and the student


def _live_tensors() -> list[torch.Tensor]:
    # type(), not isinstance(): some objects warn when their __class__ is looked up.
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]


def test_a_refused_step_leaves_no_tensor_behind(
    make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    engine.distill(A, samples(0))  # warm: lazily built buffers exist from here on
    queue = StepQueue(max_waiting=4)
    queue.start()
    real = stepping.sdpo.sdpo_loss

    def nan_loss(*args: Any, **kwargs: Any) -> Any:
        terms = real(*args, **kwargs)
        return type(terms)(**{**terms.__dict__, "total": terms.total * float("nan")})

    try:
        gc.collect()
        before = _live_tensors()
        known = {id(t) for t in before}
        with monkeypatch.context() as m:
            m.setattr(stepping.sdpo, "sdpo_loss", nan_loss)
            job = queue.submit(lambda: engine.distill(A, samples(1)))
            error = job.future.exception(timeout=600)
        assert isinstance(error, NonFiniteLoss)
        # The future, its error and the queue's last job are all still held here, as a caller
        # formatting the error response would hold them.
        gc.collect()
        new = [t for t in _live_tensors() if id(t) not in known]
        left = sum(t.numel() * t.element_size() for t in new)
        assert new == [], f"{len(new)} tensors ({left} bytes) outlived the failed step: " + ", ".join(
            f"{tuple(t.shape)} {t.dtype}" for t in new[:10]
        )
        assert error.__traceback__ is not None  # the error still says where it happened
        del before
    finally:
        queue.close()
        queue.join(timeout=60)


def test_a_warm_step_moves_the_minimum(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    for adapter in (A, B):
        engine.init_adapter(adapter, LORA, 1)
    engine.distill(A, samples(0))
    engine.distill(B, samples(1))
    engine.distill(A, samples(2))  # every buffer exists; the slot now holds A
    with counting() as swap:
        assert engine.distill(B, samples(3)).cache_hit  # B's bundle goes up: a real restore
    with counting() as same:
        assert engine.distill(B, samples(4)).cache_hit  # the slot already holds B: no restore
    for counts in (swap, same):
        known = (*FOREIGN_NOT_CROSSINGS, FOREIGN_SYNC)
        unexplained = [s for s in counts.foreign if not s.split(":")[0].endswith(known)]
        assert unexplained == [], counts.foreign
        assert sum(n for s, n in counts.foreign.items() if FOREIGN_SYNC in s) == FORWARDS
    assert (swap.copies, swap.syncs) == (3, 2), swap.ours
    assert (same.copies, same.syncs) == (2, 2), same.ours
