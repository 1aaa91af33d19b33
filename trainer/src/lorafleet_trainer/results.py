"""What engine calls return: adapter state, init, step and sampling results, and counters.

Plain typed dataclasses in the engine's own terms (an :class:`AdapterId`, a :class:`LoraSpec`). The
service turns each into its one HTTP response model (``lorafleet_api.wire``, in
``service.responses``) field by field; nothing here knows the wire format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, Overrides, TrainingSpec
from lorafleet_trainer.learning.samples import DistillSample


@dataclass(frozen=True)
class AdapterRecord:
    """What the engine knows of one stored adapter (its wire answer: ``wire.AdapterState``)."""

    adapter: AdapterId
    version: int
    epoch: int
    lora: LoraSpec
    training: TrainingSpec
    cached: bool
    cache_bytes: int
    pinned: bool = False
    artifact: str = ""  # the durable version's directory relative to the store root (storage.artifact)
    durable_version: int | None = None  # None: the same as version (always so in sync mode)
    durable_error: str | None = None  # why a newer version is not durable: the store refused it

    @property
    def durable(self) -> int:
        return self.version if self.durable_version is None else self.durable_version


@dataclass(frozen=True)
class InitResult:
    created: bool
    state: AdapterRecord


@dataclass(frozen=True)
class StepResult:
    version: int
    cache_hit: bool
    metrics: dict[str, float]
    timing_ms: dict[str, float]
    storage_read_bytes: int = 0
    artifact: str = ""
    replayed: bool = False  # an earlier step's answer, for a retry with its idempotency key
    # The adapter's newest durable version when the step answered; None: ``version`` (sync mode).
    durable_version: int | None = None
    # Adapters whose steps shared the forward and backward that made this version (1: its own step).
    fused_adapters: int = 1

    @property
    def durable(self) -> int:
        return self.version if self.durable_version is None else self.durable_version


@dataclass(frozen=True)
class StepKey:
    """A client's idempotency key for a step, and the digest of the request it came with."""

    key: str
    digest: str


@dataclass(frozen=True)
class StepRequest:
    """One adapter's step as ``TrainerEngine.distill`` takes it, for ``distill_many`` (fused steps)."""

    adapter: AdapterId
    samples: Sequence[DistillSample]
    training: Overrides = None
    key: StepKey | None = None


@dataclass(frozen=True)
class KeyedStep:
    """What a keyed step answered, committed with its version (``lorafleet.json``)."""

    key: StepKey
    version: int
    artifact: str
    cache_hit: bool
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key.key,
            "digest": self.key.digest,
            "version": self.version,
            "artifact": self.artifact,
            "cache_hit": self.cache_hit,
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeyedStep:
        return cls(
            key=StepKey(str(d["key"]), str(d["digest"])),
            version=int(d["version"]),
            artifact=str(d["artifact"]),
            cache_hit=bool(d["cache_hit"]),
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
        )

    def replay(self) -> StepResult:
        """The answer again; it took no time and read nothing."""
        return StepResult(
            version=self.version,
            cache_hit=self.cache_hit,
            metrics=dict(self.metrics),
            timing_ms={},
            artifact=self.artifact,
            replayed=True,
        )


@dataclass(frozen=True)
class Generation:
    """A sampled response and the prompt it continues, in the terms of a distill sample."""

    version: int | None  # the adapter version that answered; None for the bare base model
    cache_hit: bool | None  # whether that version came from the CPU cache; None for the base model
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    prompt_text: str
    finish_reason: Literal["stop", "length"]
    seed: int
    timing_ms: dict[str, float]


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's monotonic counters and gauges."""

    cache_hits: int = 0
    cache_misses: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    storage_read_bytes: int = 0
    storage_write_bytes: int = 0
    tokens: int = 0
    steps_ok: int = 0
    steps_failed: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_capacity_bytes: int = 0
    host_pinned_bytes: int = 0
    gpu_memory_allocated_bytes: int = 0
    gpu_memory_reserved_bytes: int = 0
    gpu_memory_peak_bytes: int = 0
    gpu_memory_after_step_bytes: int = 0
    durable_lag_versions: int = 0  # async mode: most versions any adapter is ahead of its durable one
    write_backlog_versions: int = 0  # async mode: versions waiting for the writer or being written
    writes_coalesced: int = 0  # async mode: versions a newer one replaced before they were written
    write_failures: int = 0  # async mode: background writes the store refused

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scored:
    """The log-probability of each given response token under one version (None: the base)."""

    version: int | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    prob: float


@dataclass(frozen=True)
class PositionTop:
    """One position of the teacher's answer: its token, and each side's most likely tokens."""

    token: TopToken  # the teacher's greedy choice, with the teacher's probability of it
    student_prob: float  # the student's probability of that same token
    teacher: list[TopToken]
    student: list[TopToken]


@dataclass(frozen=True)
class TeacherPreview:
    version: int | None
    template: str
    teacher_prompt: str
    teacher_text: str
    student_text: str
    positions: list[PositionTop]
