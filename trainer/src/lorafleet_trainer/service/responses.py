"""The trainer's answers as wire models (``lorafleet_api.wire``), built from the engine's results.

Each builder takes one typed result of the engine and returns the response model the route
serves, so the mapping from what the engine knows to what a client reads is in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from lorafleet_api import wire
from lorafleet_api.adapters import Lora
from lorafleet_trainer import results
from lorafleet_trainer.ids import AdapterId

if TYPE_CHECKING:  # the cache module imports torch; this one must not
    from lorafleet_trainer.engine.cache import CacheInfo


def cache_label(hit: bool | None) -> Literal["hit", "miss"] | None:
    """Where the answering version came from: the CPU cache, storage, or (None) the bare base."""
    return None if hit is None else "hit" if hit else "miss"


def adapter_state(state: results.AdapterRecord) -> wire.AdapterState:
    """An adapter's state, before the publisher adds what the servers serve."""
    lora = state.lora
    return wire.AdapterState(
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
        durable_version=state.durable,
        durable_error=state.durable_error,
        served_name=None,
        served=[],
    )


def cache_state(info: CacheInfo) -> wire.CacheState:
    return wire.CacheState(
        capacity_bytes=info.capacity_bytes,
        used_bytes=info.used_bytes,
        entries=[
            wire.CacheEntry(adapter=e["adapter"], bytes=e["bytes"], pinned=e["pinned"], version=e["version"])
            for e in info.entries
        ],
    )


def sample_draft(gen: results.Generation, user_prompt: str | None, system_prompt: str) -> wire.SampleDraft:
    """A generated answer as a distill sample, every field but the feedback."""
    return wire.SampleDraft(
        prompt=gen.prompt_text,
        response=gen.text,
        prompt_token_ids=gen.prompt_token_ids,
        response_token_ids=gen.token_ids,
        response_logprobs=gen.logprobs,
        user_prompt=user_prompt,
        system_prompt=system_prompt,
    )


def generation(
    adapter: AdapterId | None,
    gen: results.Generation,
    user_prompt: str | None,
    system_prompt: str,
    timing: wire.GenerateTiming,
) -> wire.GenerateResponse:
    return wire.GenerateResponse(
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
        sample=sample_draft(gen, user_prompt, system_prompt),
    )


def teacher_preview(adapter: AdapterId | None, preview: results.TeacherPreview) -> wire.TeacherResponse:
    def top(t: results.TopToken) -> wire.TopTokenOut:
        return wire.TopTokenOut(id=t.id, text=t.text, prob=t.prob)

    return wire.TeacherResponse(
        adapter=str(adapter) if adapter is not None else None,
        version=preview.version,
        template=preview.template,
        teacher_prompt=preview.teacher_prompt,
        teacher_text=preview.teacher_text,
        student_text=preview.student_text,
        positions=[
            wire.PositionOut(
                token=top(p.token),
                student_prob=p.student_prob,
                teacher=[top(t) for t in p.teacher],
                student=[top(t) for t in p.student],
            )
            for p in preview.positions
        ],
    )
