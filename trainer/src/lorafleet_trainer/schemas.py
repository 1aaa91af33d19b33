"""Request and response bodies of the trainer HTTP API, as pydantic models (snake_case JSON).

They give ``/openapi.json`` its types and bounds and refuse malformed JSON early, naming the field.
The engine's own parsers (``LoraSpec``, ``TrainingSpec``, ``DistillSample``) stay the authority on
meaning: a request that passes here is validated again there, against the loaded model too (token
ids against its vocabulary). Strict types: a JSON string is never silently turned into a number.
Each response model is built once, by the service, from the engine's typed result (``of``), and
FastAPI serialises it as is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lorafleet_trainer import limits, results
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.limits import LORA, TRAINING
from lorafleet_trainer.samples import MAX_SAMPLE_TOKENS

if TYPE_CHECKING:  # the cache module imports torch; this one must not
    from lorafleet_trainer.cache import CacheInfo

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_SAMPLES = 1024
MAX_ROLLOUT_ROWS = 64  # prompts x n of one rollouts request: one padded batch on the device
ARTIFACT = (
    "the version's PEFT adapter directory, relative to the adapter store's root; it is never "
    "rewritten and stays while the version is among the kept ones"
)

_REQUEST = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="ignore")

TokenId = Annotated[int, Field(ge=0)]
LogProb = Annotated[float, Field(le=0.0)]
# The LoRA and training fields take their bounds, patterns and defaults from the CRD (``limits``).
ModuleName = Annotated[str, limits.item_field(LORA["target_modules"])]
TemplateName = Annotated[str, limits.one_of(TRAINING["teacher_template"])]
TeacherKind = Annotated[str, limits.one_of(TRAINING["teacher"])]


class Lora(BaseModel):
    """The LoRA shape of an adapter; fixed once the adapter exists."""

    model_config = _REQUEST

    rank: int = limits.field(LORA["rank"])
    alpha: float = limits.field(LORA["alpha"])
    dropout: float = limits.field(LORA["dropout"])
    target_modules: Annotated[list[ModuleName], AfterValidator(limits.unique)] = limits.field(
        LORA["target_modules"]
    )


class Training(BaseModel):
    """SDPO step settings; every field is optional and falls back to the adapter's defaults."""

    model_config = _REQUEST

    learning_rate: float | None = limits.field(TRAINING["learning_rate"], None)
    alpha: float | None = limits.field(TRAINING["alpha"], None)
    is_clip: float | None = limits.field(TRAINING["is_clip"], None)
    max_grad_norm: float | None = limits.field(TRAINING["max_grad_norm"], None)
    kl_reg_weight: float | None = limits.field(TRAINING["kl_reg_weight"], None)
    is_floor: float | None = limits.field(TRAINING["is_floor"], None)
    teacher_top_k: int | None = limits.field(TRAINING["teacher_top_k"], None)
    teacher: TeacherKind | None = limits.field(TRAINING["teacher"], None)
    teacher_ema_rate: float | None = limits.field(TRAINING["teacher_ema_rate"], None)
    teacher_template: TemplateName | None = limits.field(TRAINING["teacher_template"], None)
    teacher_custom_template: str | None = limits.field(TRAINING["teacher_custom_template"], None)


class CacheOptions(BaseModel):
    """How the CPU cache treats this adapter (the LoraAdapter's ``spec.cache``)."""

    model_config = _REQUEST

    pinned: bool = Field(False, description="never evicted to make room (LRU)")


ServedName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]


class AdapterServing(BaseModel):
    model_config = _REQUEST

    name: ServedName = Field(description="the adapter's model name on the inference servers")


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
    serving: AdapterServing | None = Field(
        None, description="publish the adapter's versions to the pool's inference servers under this name"
    )


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
    demonstration: str = Field("", description="an example of a good answer, for the teacher template")


class DistillRequest(BaseModel):
    """One SDPO step over a batch of samples."""

    model_config = _REQUEST

    samples: list[Sample] = Field(min_length=1, max_length=MAX_SAMPLES)
    training: Training | None = None


class ServedVersion(BaseModel):
    model_config = _RESPONSE

    server: str = Field(description="the server's pod name")
    version: int | None = Field(description="the version it serves; null for none")
    error: str | None = Field(description="why the newest version is not served there, if it is not")
    since: str | None = Field(description="when version or error last changed (RFC 3339)")


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
    served_name: str | None = Field(None, description="its name on the inference servers, if published")
    served: list[ServedVersion] = Field(
        default_factory=list, description="per inference server: the version it serves and its last error"
    )

    @classmethod
    def of(cls, state: results.AdapterState) -> AdapterState:
        lora = state.lora
        return cls(
            namespace=state.adapter.namespace,
            name=state.adapter.name,
            version=state.version,
            epoch=state.epoch,
            lora=Lora(
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
                target_modules=list(lora.target_modules),
            ),
            cached=state.cached,
            cache_bytes=state.cache_bytes,
            artifact=state.artifact,
            served_name=None,
        )


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


class ServerRef(BaseModel):
    model_config = _REQUEST

    name: str = Field(min_length=1, max_length=253, description="the server's pod name")
    url: str = Field(pattern=r"^https?://[^/\s]+$", max_length=300, description="its base URL")


class OwnedAdapter(BaseModel):
    model_config = _REQUEST

    namespace: str = Field(pattern=DNS1123_LABEL, max_length=63)
    name: str = Field(pattern=DNS1123_LABEL, max_length=63)
    served_name: ServedName


class ServingRequest(BaseModel):
    """The pool's inference servers and the adapters this pod owns (sent by the operator)."""

    model_config = _REQUEST

    servers: list[ServerRef] = Field(max_length=1000)
    adapters: list[OwnedAdapter] = Field(default_factory=list, max_length=100_000)
    adapter_root: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="where the servers mount the adapter store (default: this trainer's --storage)",
    )


class ServingState(BaseModel):
    model_config = _RESPONSE

    servers: list[str]
    adapter_root: str
    lag_versions: int = Field(description="most versions any server is behind on any owned adapter")
    lag_seconds: float = Field(description="how long the oldest unserved commit has waited")


class Unpublished(BaseModel):
    servers: dict[str, str] = Field(description='server -> "unloaded", "absent" or the error')


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

    @classmethod
    def of(cls, info: CacheInfo) -> CacheState:
        return cls(
            capacity_bytes=info.capacity_bytes,
            used_bytes=info.used_bytes,
            entries=[
                CacheEntry(adapter=e["adapter"], bytes=e["bytes"], pinned=e["pinned"], version=e["version"])
                for e in info.entries
            ],
        )


class Message(BaseModel):
    """One chat turn, rendered through the model's chat template."""

    model_config = _REQUEST

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_SAMPLE_TOKENS * 8)


class PromptIn(BaseModel):
    """One prompt: chat ``messages`` or ``prompt_token_ids``, not both."""

    model_config = _REQUEST

    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    prompt_token_ids: list[TokenId] | None = Field(None, min_length=1, max_length=MAX_SAMPLE_TOKENS)


class GenerateRequest(PromptIn):
    """Sample one answer: give ``messages`` or ``prompt_token_ids``, not both."""

    max_tokens: int | None = Field(
        None, ge=1, description="most tokens to sample, <= --max-generate-tokens (default: 64 or that bound)"
    )
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 is greedy decoding")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="seeds sampling at temperature > 0; drawn (and returned) if absent",
    )


class SampleDraft(BaseModel):
    """A distill sample for this rollout, every field but ``feedback``: add it and post to distill."""

    model_config = _RESPONSE

    prompt: str
    response: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    user_prompt: str | None
    system_prompt: str


class ReadySample(SampleDraft):
    """A rollout's distill sample with its feedback: post it to distill as it is."""

    feedback: str


class GenerateTiming(BaseModel):
    model_config = _RESPONSE

    queue: float = Field(description="ms waiting for the worker")
    restore: float = Field(description="ms putting the adapter's version into its slot")
    compute: float = Field(description="ms decoding")
    total: float = Field(description="ms from acceptance to result (queue included)")


def cache_label(hit: bool | None) -> Literal["hit", "miss"] | None:
    """Where the answering version came from: the CPU cache, storage, or (None) the bare base."""
    return None if hit is None else "hit" if hit else "miss"


class GenerateResponse(BaseModel):
    model_config = _RESPONSE

    adapter: str | None = Field(description="namespace/name, or null for the bare base model")
    version: int | None = Field(description="the adapter version that answered (null: base model)")
    cache: Literal["hit", "miss"] | None = Field(description="where that version came from")
    text: str = Field(description="the answer, special tokens left out")
    token_ids: list[int] = Field(description="the sampled tokens, an end-of-turn token included")
    logprobs: list[float] = Field(
        description="per token: log_softmax of the model's logits at temperature 1, whatever the "
        "sampling temperature; what a distill step recomputes as the student's logprob"
    )
    prompt_token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    seed: int
    timing_ms: GenerateTiming
    sample: SampleDraft

    @classmethod
    def of(
        cls,
        adapter: AdapterId | None,
        gen: results.Generation,
        user_prompt: str | None,
        system_prompt: str,
        timing: GenerateTiming,
    ) -> GenerateResponse:
        return cls(
            adapter=str(adapter) if adapter is not None else None,
            version=gen.version,
            cache=cache_label(gen.cache_hit),
            text=gen.text,
            token_ids=gen.token_ids,
            logprobs=gen.logprobs,
            prompt_token_ids=gen.prompt_token_ids,
            finish_reason=gen.finish_reason,
            seed=gen.seed,
            timing_ms=timing,
            sample=cls.draft(gen, user_prompt, system_prompt),
        )

    @staticmethod
    def draft(gen: results.Generation, user_prompt: str | None, system_prompt: str) -> SampleDraft:
        return SampleDraft(
            prompt=gen.prompt_text,
            response=gen.text,
            prompt_token_ids=gen.prompt_token_ids,
            response_token_ids=gen.token_ids,
            response_logprobs=gen.logprobs,
            user_prompt=user_prompt,
            system_prompt=system_prompt,
        )


class RolloutsRequest(BaseModel):
    """Fresh answers of the adapter's current version, ``n`` per prompt, decoded as one batch."""

    model_config = _REQUEST

    prompts: list[PromptIn] = Field(min_length=1, max_length=MAX_ROLLOUT_ROWS)
    n: int = Field(1, ge=1, le=MAX_ROLLOUT_ROWS, description="answers per prompt")
    max_tokens: int | None = Field(None, ge=1, description="most tokens per answer, <= --max-generate-tokens")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 is greedy decoding")
    seed: int | None = Field(
        None, ge=0, le=2**62, description="row i (prompt-major) samples with seed + i; drawn if absent"
    )
    feedback: str | None = Field(
        None, min_length=1, description="added to every sample, which is then ready to post to distill"
    )


class Rollout(BaseModel):
    model_config = _RESPONSE

    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    seed: int
    sample: ReadySample | SampleDraft = Field(
        description="a distill sample; with the request's feedback in it, ready to post to distill"
    )


class RolloutsResponse(BaseModel):
    model_config = _RESPONSE

    adapter: str | None
    version: int | None
    cache: Literal["hit", "miss"] | None
    rollouts: list[Rollout]
    timing_ms: GenerateTiming


class ScoreRequest(PromptIn):
    """The log-probability of a given answer (text or token ids) after a prompt, under the adapter's
    current version: the figure a step recomputes as the student's logprob."""

    response: str | None = Field(None, min_length=1, max_length=MAX_SAMPLE_TOKENS * 8)
    response_token_ids: list[TokenId] | None = Field(None, min_length=1, max_length=MAX_SAMPLE_TOKENS)


class ScoreResponse(BaseModel):
    model_config = _RESPONSE

    adapter: str | None
    version: int | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    mean_logprob: float


class TeacherRequest(BaseModel):
    """What the teacher would make of ``feedback`` on the conversation in ``messages``."""

    model_config = _REQUEST

    messages: list[Message] = Field(min_length=1, max_length=256)
    feedback: str = Field(min_length=1, max_length=MAX_SAMPLE_TOKENS * 8)
    training: Training | None = Field(None, description="e.g. another teacher_template to try")
    max_tokens: int = Field(32, ge=1, le=512)
    top: int = Field(5, ge=1, le=50, description="tokens shown per position and side")


class TopTokenOut(BaseModel):
    model_config = _RESPONSE

    id: int
    text: str
    prob: float


class PositionOut(BaseModel):
    model_config = _RESPONSE

    token: TopTokenOut = Field(description="the teacher's greedy token and the teacher's probability of it")
    student_prob: float = Field(description="the student's probability of that token")
    teacher: list[TopTokenOut]
    student: list[TopTokenOut]


class TeacherResponse(BaseModel):
    model_config = _RESPONSE

    adapter: str | None
    version: int | None = Field(description="the student's version (null: the base model)")
    template: str
    teacher_prompt: str = Field(description="what the teacher reads, through the chat template")
    teacher_text: str = Field(description="the teacher's greedy answer")
    student_text: str = Field(description="the student's greedy answer, without the feedback")
    positions: list[PositionOut] = Field(description="the first tokens of the teacher's answer")

    @classmethod
    def of(cls, adapter: AdapterId | None, preview: results.TeacherPreview) -> TeacherResponse:
        def top(t: results.TopToken) -> TopTokenOut:
            return TopTokenOut(id=t.id, text=t.text, prob=t.prob)

        return cls(
            adapter=str(adapter) if adapter is not None else None,
            version=preview.version,
            template=preview.template,
            teacher_prompt=preview.teacher_prompt,
            teacher_text=preview.teacher_text,
            student_text=preview.student_text,
            positions=[
                PositionOut(
                    token=top(p.token),
                    student_prob=p.student_prob,
                    teacher=[top(t) for t in p.teacher],
                    student=[top(t) for t in p.student],
                )
                for p in preview.positions
            ],
        )


class Error(BaseModel):
    error: str = Field(description="what was wrong, naming the field")
