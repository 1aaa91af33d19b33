"""KV-cached decoding: one forward over the prompt, then one token at a time until a stop token.

Runs without gradients on whatever model it is given (the base model, or the PEFT model with one
adapter active); the sampling rules and the meaning of each logprob are in :mod:`sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorafleet_trainer.sampling import Sampled, SamplingParams


@torch.no_grad()
def sample(
    model: Any,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stop: set[int],
    device: torch.device,
    max_positions: int,
) -> Sampled:
    """Decode up to ``params.max_tokens`` tokens after ``prompt_ids`` with a KV cache."""
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    budget = min(params.max_tokens, max_positions - len(prompt_ids))
    tokens: list[int] = []
    logprobs: list[float] = []
    x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    while True:
        logits = out.logits[0, -1].float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        if params.temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / params.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        if token in stop:
            return Sampled(tokens, logprobs, "stop")
        if len(tokens) >= budget:
            return Sampled(tokens, logprobs, "length")
        x = torch.tensor([[token]], dtype=torch.long, device=device)
        out = model(input_ids=x, cache=out.cache, use_cache=True, logits_to_keep=1)
