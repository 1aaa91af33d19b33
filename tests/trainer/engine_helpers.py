"""Helpers for engine tests: valid samples for builtin:tiny and fast training settings."""

from __future__ import annotations

import random
from typing import Any

import torch

from lorafleet_trainer.engine.storage import AdapterStore
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample


def sample_dict(seed: int, prompt_len: int = 6, response_len: int = 5) -> dict[str, Any]:
    """A valid distill sample whose ids fit builtin:tiny's byte-level vocabulary."""
    rng = random.Random(seed)
    return {
        "prompt": f"question {seed}",
        "response": f"answer {seed}",
        "feedback": f"make answer {seed} shorter",
        "response_logprobs": [-rng.uniform(0.5, 3.0) for _ in range(response_len)],
        "prompt_token_ids": [rng.randrange(0, 256) for _ in range(prompt_len)],
        "response_token_ids": [rng.randrange(0, 256) for _ in range(response_len)],
        "user_prompt": f"question {seed}",
        "system_prompt": "You are terse.",
    }


# Large enough steps that weights and moments visibly move in a few steps.
FAST_TRAINING = TrainingSpec(learning_rate=1e-2, teacher_top_k=16)


def samples(seed: int, n: int = 2) -> list[DistillSample]:
    return [DistillSample.from_dict(sample_dict(seed * 100 + i)) for i in range(n)]


def stored_state(store: AdapterStore, adapter: AdapterId) -> dict[str, torch.Tensor]:
    """The stored adapter as the flat layout cache entries use (w./m./v. + step)."""
    return store.read_tensors(adapter).as_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
