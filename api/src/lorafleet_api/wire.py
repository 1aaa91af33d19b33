"""The body of every trainer route, request and response, as pydantic models (snake_case JSON).

The trainer serves these (they give ``/openapi.json`` its types and bounds and refuse malformed JSON
early, naming the field), and the operator, the gateway and the operator tests' fake trainer read
and answer with the same classes, so a renamed or missing field fails on both sides at once.
Requests are strict (a JSON string is never silently turned into a number) and refuse unknown
fields; responses ignore fields they do not know, so a newer trainer can add some, and refuse
missing ones. The trainer's engine stays the authority on meaning (token ids against the loaded
model's vocabulary); this module is the authority on shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_api.adapters import DNS1123_LABEL, AdapterSpec, CacheOptions, Lora, ServedName, Training

MAX_SAMPLE_TOKENS = 65536  # prompt and response of one sample, together
MAX_SAMPLES = 1024
MAX_ROLLOUT_ROWS = 64  # prompts x n of one rollouts request: one padded batch on the device
KEYED_STEPS_KEPT = 64  # per adapter: the keyed steps whose answers a retry gets back
IDEMPOTENCY_KEY = r"^[\x21-\x7e]{1,200}$"  # printable ASCII, no spaces (as an HTTP header carries it)
ARTIFACT = (
    "the version's PEFT adapter directory, relative to the adapter store's root; it is never "
    "rewritten and stays while the version is among the kept ones"
)

DURABLE_VERSION = (
    "the adapter's newest version in the adapter store, which a crash of the trainer keeps: equal to "
    "version with durability sync; with async it may lag, and the versions past it are lost by a "
    "crash (and some are never written: a newer one replaces a version still waiting for the writer)"
)

_REQUEST = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="ignore")

TokenId = Annotated[int, Field(ge=0)]
LogProb = Annotated[float, Field(le=0.0)]


class PublishAs(BaseModel):
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
    serving: PublishAs | None = Field(
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
    idempotency_key: str | None = Field(
        None,
        pattern=IDEMPOTENCY_KEY,
        description="a retry with the same key and body gets the first answer back (replayed: true) "
        "instead of a second step, across trainer restarts: the key is committed with the version. "
        f"Each adapter remembers its last {KEYED_STEPS_KEPT} keys; the same key with another body is "
        "refused (409)",
    )
    request_digest: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="with idempotency_key: the SHA-256 of the request this step was built from (a "
        "gateway's feedback), compared on a retry instead of the digest of this body",
    )


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
    artifact: str = Field(description=f"the durable version's artifact: {ARTIFACT}")
    durable_version: int = Field(description=DURABLE_VERSION)
    durable_error: str | None = Field(
        description="why versions past durable_version are not durable yet: the adapter store refused "
        "the background write (the next step retries it first); null when none"
    )
    # Required though nullable: a reader must never take a field left out for "not published".
    served_name: str | None = Field(description="its name on the inference servers; null: not published")
    served: list[ServedVersion] = Field(
        description="per inference server: the version it serves and its last error"
    )


class Changes(BaseModel):
    """``GET /v1/changes``: the adapters whose state changed after a follower's last number."""

    model_config = _RESPONSE

    instance: str = Field(description="this trainer process; numbers are only comparable within one")
    seq: int = Field(description="the number of the latest change; pass it as since next time")
    adapters: list[AdapterState] = Field(description="the current state of each adapter changed since")


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
    artifact: str = Field(
        description=f"{ARTIFACT}; with durability async it exists once durable_version reaches version"
    )
    durable_version: int = Field(description=DURABLE_VERSION)
    cache: Literal["hit", "miss"]
    metrics: dict[str, float] = Field(
        description="total_loss, distill_loss, kl_reg, mean_is_ratio, clip_fraction, grad_norm, "
        "tokens_processed, batch_size"
    )
    timing_ms: StepTiming
    replayed: bool = Field(
        description="true: the answer of an earlier step with this idempotency key; nothing was applied now"
    )


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
    model_config = _RESPONSE

    servers: dict[str, str] = Field(description='server -> "unloaded", "absent" or the error')


class Evicted(BaseModel):
    model_config = _RESPONSE

    evicted: bool


class Deleted(BaseModel):
    model_config = _RESPONSE

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


class Error(BaseModel):
    """Every error answer: what was wrong and, where one field was, which (``lora.rank``,
    ``samples[2].feedback``, ``epoch``), so a client can act on it without parsing the text."""

    model_config = _RESPONSE

    error: str = Field(description="what was wrong, naming the field")
    field: str | None = Field(None, description="the request field at fault, if one is")


def init_request(spec: AdapterSpec, epoch: int, name: str | None = None) -> InitRequest:
    """The init body for a LoraAdapter's spec: its LoRA shape, the training fields it sets (the
    trainer's defaults, the CRD's, fill the rest), its cache pinning and (given the adapter's
    ``name``) the name its versions are published under."""
    training = spec.training if spec.training.given() else None
    serving = PublishAs(name=spec.served_name(name)) if name is not None else None
    return InitRequest(lora=spec.lora, epoch=epoch, training=training, cache=spec.cache, serving=serving)
