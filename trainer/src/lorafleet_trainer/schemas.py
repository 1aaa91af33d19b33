"""Request and response bodies of the trainer HTTP API, as pydantic models (snake_case JSON).

They give ``/openapi.json`` its types and bounds and refuse malformed JSON early, naming the field.
The engine's own parsers (``LoraSpec``, ``TrainingSpec``, ``DistillSample``) stay the authority on
meaning: a request that passes here is validated again there, against the loaded model too (token
ids against its vocabulary). Strict types: a JSON string is never silently turned into a number.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_trainer.configs import MAX_RANK, LoraSpec
from lorafleet_trainer.samples import MAX_SAMPLE_TOKENS

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_SAMPLES = 1024
ARTIFACT = (
    "the version's PEFT adapter directory, relative to the adapter store's root; it is never "
    "rewritten and stays while the version is among the kept ones"
)

_REQUEST = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="ignore")

TokenId = Annotated[int, Field(ge=0)]
LogProb = Annotated[float, Field(le=0.0)]
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Lora(BaseModel):
    """The LoRA shape of an adapter; fixed once the adapter exists."""

    model_config = _REQUEST

    rank: int = Field(LoraSpec.rank, ge=1, le=MAX_RANK)
    alpha: float = Field(LoraSpec.alpha, gt=0.0)
    dropout: float = Field(LoraSpec.dropout, ge=0.0, lt=1.0)
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: list(LoraSpec.target_modules), min_length=1, max_length=64
    )


class Training(BaseModel):
    """SDPO step settings; every field is optional and falls back to the adapter's defaults."""

    model_config = _REQUEST

    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="weight of the reverse KL term")
    is_clip: float | None = Field(None, gt=0.0, description="importance-sampling ratio clip")
    max_grad_norm: float | None = Field(None, gt=0.0)
    kl_reg_weight: float | None = Field(None, ge=0.0)
    teacher_top_k: int | None = Field(None, ge=1)


class CacheOptions(BaseModel):
    """How the CPU cache treats this adapter (the LoraAdapter's ``spec.cache``)."""

    model_config = _REQUEST

    pinned: bool = Field(False, description="never evicted to make room (LRU)")


class InitRequest(BaseModel):
    """Create the stored adapter if absent, or confirm its config; sets the placement epoch."""

    model_config = _REQUEST

    lora: Lora
    # le: the CRD stores the epoch as an int64; a larger one could never be matched again.
    epoch: int = Field(
        0, ge=0, le=2**63 - 1, description="placement epoch; cached state of an older epoch is dropped"
    )
    training: Training | None = Field(None, description="the adapter's default training settings")
    cache: CacheOptions | None = None


class Sample(BaseModel):
    """One rollout and the feedback it received."""

    model_config = _REQUEST

    prompt: str = ""
    response: str = ""
    feedback: str = Field(min_length=1)
    response_logprobs: list[LogProb] = Field(min_length=1, max_length=MAX_SAMPLE_TOKENS)
    prompt_token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_SAMPLE_TOKENS)
    response_token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_SAMPLE_TOKENS)
    user_prompt: str | None = Field(None, description="the user's words; defaults to prompt")
    system_prompt: str = ""


class DistillRequest(BaseModel):
    """One SDPO step over a batch of samples."""

    model_config = _REQUEST

    samples: list[Sample] = Field(min_length=1, max_length=MAX_SAMPLES)
    training: Training | None = None


class AdapterState(BaseModel):
    model_config = _RESPONSE

    namespace: str
    name: str
    version: int = Field(description="distill steps applied")
    epoch: int
    lora: Lora
    cached: bool
    cache_bytes: int
    artifact: str = Field(description=ARTIFACT)


class StepTiming(BaseModel):
    model_config = _RESPONSE

    queue: float = Field(description="ms waiting for the step worker")
    restore: float
    compute: float
    snapshot: float
    persist: float
    total: float = Field(description="ms from acceptance to result (queue included)")


class DistillResponse(BaseModel):
    model_config = _RESPONSE

    version: int
    artifact: str = Field(description=ARTIFACT)
    cache: Literal["hit", "miss"]
    metrics: dict[str, float] = Field(
        description="total_loss, distill_loss, kl_reg, mean_is_ratio, clip_fraction, grad_norm, "
        "tokens_processed, batch_size"
    )
    timing_ms: StepTiming


class Evicted(BaseModel):
    evicted: bool


class Deleted(BaseModel):
    deleted: bool


class CacheEntry(BaseModel):
    model_config = _RESPONSE

    adapter: str = Field(description="namespace/name")
    bytes: int
    pinned: bool
    version: int


class CacheState(BaseModel):
    model_config = _RESPONSE

    capacity_bytes: int
    used_bytes: int
    entries: list[CacheEntry]


class Error(BaseModel):
    error: str = Field(description="what was wrong, naming the field")
