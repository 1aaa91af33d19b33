"""Prefix caching and in-place reloads: a chat after a publish is answered by the new version.

The trainer publishes each committed version to vLLM under the adapter's one served name, in place
(``load_lora_adapter`` with ``load_inplace``), from that version's own directory in the store
(``<ns>/.<name>.v<version>-<unique>``, a name no other write uses). vLLM's prefix cache (on:
``live_vllm`` passes ``--enable-prefix-caching``, the CPU build's default too) keys a cached block
by the adapter's name and the path it was loaded from, so KV computed with one version is not used
for another, although the name stays. The LoRA targets k_proj and v_proj, so a cached prefix's KV
depends on the weights.

The first test warms the cache with a long shared system prompt at version v (trained away from the
base model), publishes a version whose greedy answer differs, and checks that vLLM answers as the
trainer does at that version, with no cached block of v used (vLLM's ``prefix_cache_hits`` counter
does not move) while a repeat at one version does hit the cache, so the cached path is exercised.

The second deletes an adapter and creates it again under the same name: its new version 1 has the
old version 1's number but a directory of its own, so no block the old one left cached (an unload
does not drop them) is used, and vLLM answers as the trainer does. (When artifact paths were the
version's number alone, vLLM answered the new version 1 from the old one's KV: 256 prompt tokens
hit, an answer other than the trainer's.) The same weights loaded under a name of their own, from a
cold cache, are the reference for what vLLM answers.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from tests.serving import live_vllm
from tests.trainer.service import live

pytestmark = pytest.mark.vllm

NS = "team-kv"
SERVER = "vllm-0"
# About 300 tokens: two of vLLM's CPU blocks (128 tokens) are full and can be cached.
SYSTEM = " ".join(
    [
        "You are the help desk assistant of a small travel agency that plans trips in Europe.",
        "Answer every question briefly and politely, in one or two sentences, without lists.",
        "When a customer asks about a city, name its country first and then one thing to see there.",
        "Never invent prices, opening hours, train times or flight numbers; say that you do not know.",
        "If a question is not about travel, answer it anyway, as briefly as you can, and stop.",
        "Do not ask follow-up questions and do not greet the customer at the start of an answer.",
        "The agency is open from Monday to Friday; bookings are made by the customer on the website.",
        "Customers often travel by train, so mention the train when a city is well connected by rail.",
        "Keep a friendly tone, do not use exclamation marks, and do not repeat the customer's question.",
        "When you are unsure, say so in a few words rather than guessing an answer that may be wrong.",
        "The agency's customers come from many countries, so avoid idioms and use plain, simple words.",
        "Never recommend a specific hotel, restaurant or shop by name, and never discuss other agencies.",
        "If the customer writes in a language other than English, you may answer in that language.",
        "Dates are written as day, month and year, and distances are given in kilometres, not miles.",
        "Remember that many customers read your answers on a phone, so short answers are always better.",
    ]
)
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
MAX_TOKENS = 16
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# Strong enough that a step or two moves a 135M model's greedy answer (as in the hand-off test).
TRAINING = {"learning_rate": 1e-3, "teacher_top_k": 50}
MAX_STEPS = 4
BLOCK_TOKENS = 128  # vLLM's CPU block size: the unit the prefix cache hits in


def _served(trainer: live.LiveTrainer, route: str, version: int, timeout: float = 120.0) -> None:
    """Until the trainer says vLLM serves ``version`` (its publisher loaded it)."""
    deadline = time.monotonic() + timeout
    c = trainer.client(timeout=30)
    while time.monotonic() < deadline:
        served = c.get(route).json().get("served") or []
        if any(s["server"] == SERVER and s["version"] == version and not s["error"] for s in served):
            return
        time.sleep(0.05)
    raise AssertionError(f"{route} version {version} not served in {timeout:.0f} s: {served}")


def _hits(vllm: live_vllm.LiveVllm) -> tuple[float, float]:
    """vLLM's prefix cache counters, in tokens: (hits, queries)."""
    samples = live.parse_metrics(httpx.get(f"{vllm.base_url}/metrics", timeout=30).text)
    hits = sum(v for (name, _), v in samples.items() if name == "vllm:prefix_cache_hits_total")
    queries = sum(v for (name, _), v in samples.items() if name == "vllm:prefix_cache_queries_total")
    return hits, queries


class Adapter:
    """One adapter on the shared trainer, published to the shared vLLM under ``name``."""

    def __init__(self, trainer: live.LiveTrainer, vllm: live_vllm.LiveVllm, name: str) -> None:
        self.trainer, self.vllm, self.name = trainer, vllm, name
        self.route = f"/v1/adapters/{NS}/{name}"
        self.c = trainer.client(timeout=300)

    def create(self) -> None:
        put = self.c.put(self.route, json={"lora": LORA, "epoch": 1, "serving": {"name": self.name}})
        assert put.status_code == 201, put.text
        serving = {"servers": [{"name": SERVER, "url": self.vllm.base_url}]}
        assert self.c.put("/v1/serving", json=serving).status_code == 200
        _served(self.trainer, self.route, 0)

    def delete(self) -> None:
        r = self.c.delete(self.route)
        assert r.status_code == 200 and r.json()["deleted"], r.text

    def step(self, feedback: str) -> tuple[int, str]:
        """One distill step on the adapter's own greedy answer; waits until vLLM serves it. Answers
        the new version and its artifact (relative to the trainer's store)."""
        rollout = self.c.post(
            self.route + "/rollouts",
            json={"prompts": [{"messages": MESSAGES}], "max_tokens": MAX_TOKENS, "temperature": 0.0,
                  "feedback": feedback},
        )  # fmt: skip
        assert rollout.status_code == 200, rollout.text
        body = {"samples": [rollout.json()["rollouts"][0]["sample"]], "training": TRAINING}
        step = self.c.post(self.route + "/distill", json=body)
        assert step.status_code == 200, step.text
        version = int(step.json()["version"])
        _served(self.trainer, self.route, version)
        return version, str(step.json()["artifact"])

    def trainers_answer(self) -> str:
        r = self.c.post(self.route + "/generate", json={"messages": MESSAGES, "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text
        return str(r.json()["text"])

    def served_chat(self, name: str | None = None) -> tuple[str, float, dict[str, Any]]:
        """vLLM's greedy answer through the served name (or ``name``), the prefix-cache hits it
        added (tokens) and its usage."""
        before, _ = _hits(self.vllm)
        answer = self.vllm.chat(name or self.name, MESSAGES, MAX_TOKENS)
        after, _ = _hits(self.vllm)
        return str(answer["choices"][0]["message"]["content"]), after - before, answer["usage"]


def test_a_chat_after_a_publish_is_answered_by_the_new_version_not_its_cached_prefix(
    real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm],
) -> None:
    trainer, vllm = real_servers
    a = Adapter(trainer, vllm, "kv")
    a.create()
    try:
        _check_publishes(a)
    finally:
        a.delete()


def _check_publishes(a: Adapter) -> None:
    base = a.trainers_answer()  # version 0: the LoRA's B is zero, so the base model's answer
    # Version v: trained until its greedy answer differs from the base model's.
    for _ in range(MAX_STEPS):
        v, _ = a.step("Always answer in French.")
        at_v = a.trainers_answer()
        if at_v != base:
            break
    assert at_v != base, f"{MAX_STEPS} steps did not move the greedy answer from {base!r}"

    served_v, _, usage = a.served_chat()  # warms the prefix cache with v's KV
    assert usage["prompt_tokens"] >= 2 * BLOCK_TOKENS, usage
    assert served_v == at_v, f"v{v}: vLLM {served_v!r}, the trainer {at_v!r}"
    again, hits_v, _ = a.served_chat()
    assert again == at_v
    assert hits_v >= 2 * BLOCK_TOKENS, f"the repeat at v{v} hit {hits_v} cached tokens: is prefix caching on?"

    # Later versions, published in place under the same name, until the greedy answer moves again.
    for _ in range(MAX_STEPS):
        w, _ = a.step("Always answer in French.")
        at_w = a.trainers_answer()
        if at_w != at_v:
            break
    served_w, hits_w, _ = a.served_chat()
    print(
        f"\nv{v}: {at_v!r} (repeat hit {hits_v:.0f} tokens); v{w}: trainer {at_w!r}, vLLM {served_w!r} "
        f"(hit {hits_w:.0f} tokens)"
    )
    assert served_w == at_w, f"v{w}: vLLM {served_w!r}, the trainer {at_w!r} (v{v} answered {at_v!r})"
    assert at_w != at_v, f"{MAX_STEPS} more steps did not move the greedy answer from {at_v!r}"
    assert hits_w == 0, f"v{w}'s first chat hit {hits_w} cached tokens: KV computed with v{v} was reused"
    _, hits_again, _ = a.served_chat()
    assert hits_again >= 2 * BLOCK_TOKENS  # v{w}'s own KV is cached in turn


def test_an_adapter_created_again_under_its_name_is_not_answered_from_the_old_ones_cached_prefix(
    real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm],
) -> None:
    trainer, vllm = real_servers
    a = Adapter(trainer, vllm, "kv-again")
    a.create()
    old, old_artifact = a.step("Always answer in French.")
    old_answer = a.trainers_answer()
    served_old, _, _ = a.served_chat()  # warms the prefix cache with the old adapter's KV
    assert served_old == old_answer
    a.delete()  # unloads it from vLLM; its cached blocks stay until evicted

    a.create()
    fresh = "kv-again-fresh"
    try:
        new, artifact = a.step("Always answer like a pirate.")
        assert new == old and artifact != old_artifact  # the same version, a directory of its own
        new_answer = a.trainers_answer()
        served_new, hits, _ = a.served_chat()
        # The same weights under a name of their own: no cached block can match, so this is what
        # vLLM answers for them from a cold cache.
        assert vllm.load_adapter(fresh, trainer.storage / artifact).status_code == 200
        served_fresh, fresh_hits, _ = a.served_chat(fresh)
    finally:
        httpx.post(f"{vllm.base_url}/v1/unload_lora_adapter", json={"lora_name": fresh}, timeout=60)
        a.delete()
    print(
        f"\nold v{old}: {old_answer!r}; new v{new}: trainer {new_answer!r}, vLLM {served_new!r} "
        f"(hit {hits:.0f} cached tokens); the same weights under {fresh!r}: {served_fresh!r} "
        f"(hit {fresh_hits:.0f})"
    )
    assert fresh_hits == 0 and served_fresh == new_answer, "vLLM disagrees with the trainer from a cold cache"
    assert hits == 0, f"the new v{new}'s first chat hit {hits:.0f} tokens cached with the old v{old}"
    assert served_new == new_answer, f"v{new}: vLLM {served_new!r}, the trainer {new_answer!r}"
