"""KV-cached decoding of many prompts at once: one forward over the left-padded prompts, then one
token per row at a time until every row stops.

Runs without gradients on whatever model it is given (the base model, or the PEFT model with one
adapter active); the sampling rules and the meaning of each logprob are in :mod:`sampling`. One
prompt is a batch of one: a single answer and a step's rollouts take the same path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from lorafleet_trainer.learning.sampling import Sampled, SamplingParams


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def sample_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    stop: set[int],
    device: torch.device,
    max_positions: int,
    pad_id: int,
) -> list[Sampled]:
    """Decode every prompt at once: one left-padded, KV-cached batch, a row per prompt.

    Row ``i`` draws from its own generator seeded with ``params[i].seed``, so it samples what
    :func:`sample` samples for that prompt and seed, up to the float noise of a padded batch.
    A finished row keeps its place (its new tokens are padding nobody reads) until all finish.
    """
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    # Left padding shifts every row; positions count each row's own tokens from 0.
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generators = [torch.Generator(device="cpu").manual_seed(p.seed) for p in params]
    budgets = [
        min(p.max_tokens, max_positions - len(prompt)) for p, prompt in zip(params, prompts, strict=True)
    ]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    finished: list[Literal["stop", "length"] | None] = [None] * rows
    mask, positions = mask.to(device), positions.to(device)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    while True:
        logits = out.logits[:, -1].float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        step: list[int] = []
        for i in range(rows):
            if finished[i] is not None:
                step.append(pad_id)
                continue
            token = _pick(logits[i], params[i], generators[i])
            tokens[i].append(token)
            logprobs[i].append(float(logp[i, token]))
            if token in stop:
                finished[i] = "stop"
            elif len(tokens[i]) >= budgets[i]:
                finished[i] = "length"
            step.append(token)
        if all(f is not None for f in finished):
            break
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        x = torch.tensor(step, dtype=torch.long, device=device).unsqueeze(1)
        out = model(
            input_ids=x, attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
    return [Sampled(t, lp, f or "length") for t, lp, f in zip(tokens, logprobs, finished, strict=True)]
