"""Request bodies the service tests send (valid ones, built from the builtin vocabulary)."""

from __future__ import annotations

import random
from typing import Any

LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def init_body(epoch: int = 1, **lora: Any) -> dict[str, Any]:
    return {"lora": {**LORA, **lora}, "epoch": epoch}


def sample(prompt_len: int = 6, response_len: int = 4, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "prompt": "What is two plus two?",
        "response": "Five.",
        "feedback": "Wrong: two plus two is four.",
        "response_logprobs": [-rng.uniform(0.1, 3.0) for _ in range(response_len)],
        "prompt_token_ids": [rng.randrange(3, 250) for _ in range(prompt_len)],
        "response_token_ids": [rng.randrange(3, 250) for _ in range(response_len)],
        "user_prompt": "What is two plus two?",
        "system_prompt": "You are a careful assistant.",
    }


def distill_body(n: int = 1, prompt_len: int = 6, response_len: int = 4, **training: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"samples": [sample(prompt_len, response_len, seed=i) for i in range(n)]}
    if training:
        body["training"] = training
    return body
