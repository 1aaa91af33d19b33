"""One distillation sample: a rollout (prompt and response tokens with their sampling logprobs) and
the feedback it received.

The student sees ``prompt_token_ids + response_token_ids``; the teacher sees the same response
after a chat-template prompt built from ``system_prompt``, ``user_prompt`` and ``feedback``.
Everything checkable without the model is checked here; token ids against the vocabulary are
checked by the engine, which knows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet_api.wire import MAX_SAMPLE_TOKENS
from lorafleet_trainer import validating as v
from lorafleet_trainer.errors import InvalidInput

_FIELDS = frozenset(
    {
        "prompt",
        "response",
        "feedback",
        "response_logprobs",
        "prompt_token_ids",
        "response_token_ids",
        "user_prompt",
        "system_prompt",
        "demonstration",
    }
)


def _token_ids(value: Any, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidInput("must be a non-empty list of token ids", field=field)
    out: list[int] = []
    for i, tok in enumerate(value):
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise InvalidInput("must be a non-negative integer token id", field=f"{field}[{i}]")
        out.append(tok)
    return out


def _logprobs(value: Any, field: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidInput("must be a non-empty list of numbers", field=field)
    out: list[float] = []
    for i, lp in enumerate(value):
        x = v.finite_number(lp, f"{field}[{i}]")
        if x > 0.0:
            raise InvalidInput(f"a log-probability must be <= 0, got {x}", field=f"{field}[{i}]")
        out.append(x)
    return out


@dataclass(frozen=True)
class DistillSample:
    """A validated sample; construct it with :meth:`from_dict` from request JSON."""

    prompt: str
    response: str
    feedback: str
    response_logprobs: list[float]
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    user_prompt: str
    system_prompt: str
    demonstration: str = ""  # an example of a good answer, for a teacher template that shows one

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: str = "samples[0]") -> DistillSample:
        d = v.require_mapping(d, field)
        v.reject_unknown(d, _FIELDS, field)
        for required in ("feedback", "response_logprobs", "prompt_token_ids", "response_token_ids"):
            if required not in d:
                raise InvalidInput("is required", field=f"{field}.{required}")
        prompt = v.string(d.get("prompt", ""), f"{field}.prompt")
        response = v.string(d.get("response", ""), f"{field}.response")
        feedback = v.string(d["feedback"], f"{field}.feedback", allow_empty=False)
        # The teacher needs the question it is answering; the raw prompt stands in when the
        # client did not separate the user's words from its own templating.
        user_prompt = v.string(d.get("user_prompt", prompt), f"{field}.user_prompt")
        system_prompt = v.string(d.get("system_prompt", ""), f"{field}.system_prompt")
        demonstration = v.string(d.get("demonstration", ""), f"{field}.demonstration")
        prompt_ids = _token_ids(d["prompt_token_ids"], f"{field}.prompt_token_ids")
        response_ids = _token_ids(d["response_token_ids"], f"{field}.response_token_ids")
        logprobs = _logprobs(d["response_logprobs"], f"{field}.response_logprobs")
        if len(logprobs) != len(response_ids):
            raise InvalidInput(
                f"has {len(logprobs)} entries but response_token_ids has {len(response_ids)}",
                field=f"{field}.response_logprobs",
            )
        if len(prompt_ids) + len(response_ids) > MAX_SAMPLE_TOKENS:
            raise InvalidInput(f"prompt and response exceed {MAX_SAMPLE_TOKENS} tokens", field=field)
        return cls(
            prompt=prompt,
            response=response,
            feedback=feedback,
            response_logprobs=logprobs,
            prompt_token_ids=prompt_ids,
            response_token_ids=response_ids,
            user_prompt=user_prompt,
            system_prompt=system_prompt,
            demonstration=demonstration,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "response": self.response,
            "feedback": self.feedback,
            "response_logprobs": list(self.response_logprobs),
            "prompt_token_ids": list(self.prompt_token_ids),
            "response_token_ids": list(self.response_token_ids),
            "user_prompt": self.user_prompt,
            "system_prompt": self.system_prompt,
            "demonstration": self.demonstration,
        }


def parse_samples(value: Any, field: str = "samples") -> list[DistillSample]:
    """Parse a request's ``samples`` list; every sample is validated before any is used."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InvalidInput("must be a non-empty list of samples", field=field)
    return [DistillSample.from_dict(item, f"{field}[{i}]") for i, item in enumerate(value)]
