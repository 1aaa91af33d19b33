"""Feedback in the shape CLaaS clients send, and the distill samples it becomes.

``POST /v1/feedback`` takes one item (``lora_id``, ``prompt``, ``response``, ``feedback`` and an
optional ``training``) or a batch (``{"requests": [...]}``, with CLaaS's ``orchestration``
accepted and ignored: LoraFleet never puts its servers to sleep for a step). ``lora_id`` names the
adapter as ``<namespace>/<adapter>`` or by its served name. ``completion_id`` (optional) names the
answer in the gateway's record; otherwise the record is looked up by the response's text. The
``training`` fields a client sets override the adapter's own for that step; the ones it leaves out
keep the adapter's settings (CLaaS's own defaults are not applied).

An idempotency key (the ``Idempotency-Key`` header, or ``idempotency_key`` in the body) makes a
retry safe: the trainer commits it with the version, so the same request again, through any gateway
replica and after a trainer restart, gets the first answer back instead of a second step. Without
one the gateway makes a key of its own, so its own retry after a lost answer applies nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_api import adapters, wire

MAX_BATCH = 64
KEY_PATTERN = r"^[\x21-\x7e]{1,64}$"  # the trainer's key is this, '@' and the adapter (<= 200)


class ClaasTraining(BaseModel):
    """CLaaS's TrainingConfig fields; checked against LoraFleet's bounds when the step is built."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float | None = None
    alpha: float | None = None
    is_clip: float | None = None
    max_grad_norm: float | None = None
    kl_reg_weight: float | None = None
    teacher_top_k: int | None = None

    def overrides(self) -> adapters.Training:
        """As the trainer's training overrides; raises pydantic.ValidationError naming the field."""
        return adapters.Training.model_validate(self.model_dump(exclude_none=True))


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_id: str = Field(min_length=1, max_length=512)
    prompt: str = Field(min_length=1, max_length=wire.MAX_SAMPLE_TOKENS * 8)
    response: str = Field(min_length=1, max_length=wire.MAX_SAMPLE_TOKENS * 8)
    feedback: str = Field(min_length=1, max_length=wire.MAX_SAMPLE_TOKENS * 8)
    training: ClaasTraining | None = None
    completion_id: str | None = Field(None, min_length=1, max_length=256)
    idempotency_key: str | None = Field(None, pattern=KEY_PATTERN)


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[FeedbackItem] = Field(min_length=1, max_length=MAX_BATCH)
    orchestration: dict[str, Any] | None = None
    idempotency_key: str | None = Field(None, pattern=KEY_PATTERN)


class KeyConflict(ValueError):
    """Two idempotency keys for one request (the header and the body, or two batch items)."""


class Feedback(BaseModel):
    """A feedback request, one item or a batch, with the idempotency key it came with."""

    items: list[FeedbackItem]
    idempotency_key: str | None = Field(pattern=KEY_PATTERN)
    batch: bool = False  # came as {"requests": [...]}: errors name requests[i].<field>

    def where(self, i: int) -> str:
        """The path of item ``i`` in the request body, as an error names it."""
        return f"requests[{i}]." if self.batch else ""

    @classmethod
    def parse(cls, body: Any, header_key: str | None) -> Feedback:
        """Raises pydantic.ValidationError naming the field, or KeyConflict."""
        if isinstance(body, dict) and "requests" in body:
            batch = FeedbackBatch.model_validate(body)
            found, key = batch.requests, batch.idempotency_key
            if any(item.idempotency_key is not None for item in found):
                key = _one_key(found, key)
        else:
            item = FeedbackItem.model_validate(body)
            found, key = [item], item.idempotency_key
        if header_key is not None and key is not None and header_key != key:
            raise KeyConflict("the Idempotency-Key header and the body's idempotency_key differ")
        return cls.model_validate(
            {
                "items": found,
                "idempotency_key": header_key or key,
                "batch": isinstance(body, dict) and "requests" in body,
            }
        )


def _one_key(found: list[FeedbackItem], top: str | None) -> str | None:
    keys = {item.idempotency_key for item in found} | ({top} if top is not None else set())
    if len(keys) != 1:
        raise KeyConflict("a batch takes one idempotency_key, at its top level or the same in every item")
    return keys.pop()


def digest(adapter: str, group: list[FeedbackItem]) -> str:
    """The SHA-256 of what the client asked of one adapter: a retry must ask the same."""
    canonical = json.dumps([adapter, [item.model_dump(mode="json") for item in group]], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
