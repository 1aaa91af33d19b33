"""What a sampling request is: the rollouts that feedback is given on (decoding is ``decoding``).

A prompt is either chat messages (rendered through the model's chat template, ending where the
assistant's answer begins) or token ids. ``temperature`` 0 is greedy decoding; above 0 the next
token is drawn from softmax(logits / temperature) with a generator seeded from ``seed``, so the
same request gives the same tokens.

The logprob reported for each token is ``log_softmax(logits)[token]`` of the model itself, at
temperature 1, whatever temperature chose the token. That is the quantity an SDPO step recomputes
for the same tokens (``response_logprobs`` in a distill sample), so a step on a rollout of the
adapter's current version sees an importance ratio of exactly 1, and the ratio measures only how far
the adapter moved since the rollout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lorafleet_trainer.errors import InvalidInput

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Either chat messages or token ids (exactly one is non-empty)."""

    messages: tuple[Message, ...] = ()
    token_ids: tuple[int, ...] = ()

    def teacher_reads(self) -> tuple[str | None, str]:
        """What the teacher of a distill step reads: the user's last words and the system prompt."""
        users = [m.content for m in self.messages if m.role == "user"]
        systems = [m.content for m in self.messages if m.role == "system"]
        return (users[-1] if users else None), "\n".join(systems)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Sampled:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of chat ``messages`` (role/content dicts), ending where the answer begins."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of ``messages`` through the chat template, ending where the answer begins."""
    return chat_ids(tokenizer, [{"role": m.role, "content": m.content} for m in messages])


def stop_ids(tokenizer: Any, model: Any) -> set[int]:
    """Tokens that end the answer: the tokenizer's end-of-turn token and the model's eos ids."""
    out: set[int] = set()
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        out.add(eos)
    elif isinstance(eos, (list, tuple)):
        out.update(int(e) for e in eos)
    return out


def check_prompt(ids: Sequence[int], vocab_size: int, max_positions: int, field: str) -> None:
    for j, tok in enumerate(ids):
        if tok >= vocab_size:
            raise InvalidInput(
                f"token id {tok} is outside the model's vocabulary of {vocab_size}", field=f"{field}[{j}]"
            )
    if len(ids) >= max_positions:
        raise InvalidInput(
            f"the prompt takes {len(ids)} tokens; the model's context is {max_positions}", field=field
        )
