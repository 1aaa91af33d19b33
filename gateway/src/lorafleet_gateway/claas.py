"""Feedback in the shape CLaaS clients send, and the distill samples it becomes.

``POST /v1/feedback`` takes one item (``lora_id``, ``prompt``, ``response``, ``feedback`` and an
optional ``training``) or a batch (``{"requests": [...]}``, with CLaaS's ``orchestration``
accepted and ignored: LoraFleet never puts its servers to sleep for a step). ``lora_id`` names the
adapter as ``<namespace>/<adapter>`` or by its served name. ``completion_id`` (optional) names the
answer in the gateway's record; otherwise the record is looked up by the response's text. The
``training`` fields a client sets override the adapter's own for that step; the ones it leaves out
keep the adapter's settings (CLaaS's own defaults are not applied).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_api import adapters, wire

MAX_BATCH = 64


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


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[FeedbackItem] = Field(min_length=1, max_length=MAX_BATCH)
    orchestration: dict[str, Any] | None = None


def items(body: Any) -> list[FeedbackItem]:
    """One item or a batch, as a list; raises pydantic.ValidationError naming the field."""
    if isinstance(body, dict) and "requests" in body:
        return FeedbackBatch.model_validate(body).requests
    return [FeedbackItem.model_validate(body)]
