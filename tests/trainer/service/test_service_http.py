"""The trainer API over real HTTP: a `lorafleet-trainer serve` subprocess with builtin:tiny.

Covers the cache contract (miss, hit, hit, evict, miss with storage reads flat while warm), the
PEFT-loadable export, the bad-input battery (each refusal names its field and changes nothing on
disk or in the cache) and bearer auth.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.trainer.service import live, payloads
from tests.trainer.service.conftest import TOKEN

from lorafleet_api import wire

READ_BYTES = "lorafleet_trainer_storage_read_bytes_total"
REPLAYED = ("lorafleet_trainer_steps_total", (("outcome", "replayed"),))
BOB_KEY = "bob-feedback-1"


def snapshot(server: live.LiveTrainer) -> dict[str, Any]:
    """Everything a rejected request must leave alone: stored files, the cache, engine counters."""
    files = {
        str(p.relative_to(server.storage)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(server.storage.rglob("*"))
        if p.is_file()
    }
    cache = server.client().get("/v1/cache").json()
    m = server.metrics()
    counters = {
        name: m[(name, ())]
        for name in (
            "lorafleet_trainer_cache_hits_total",
            "lorafleet_trainer_cache_misses_total",
            "lorafleet_trainer_storage_write_bytes_total",
            "lorafleet_trainer_tokens_total",
        )
    }
    return {"files": files, "cache": cache, "counters": counters}


def test_probes_and_openapi(trainer: live.LiveTrainer) -> None:
    anonymous = httpx.Client(base_url=trainer.base_url)
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").status_code == 200
    schema = anonymous.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/adapters/{namespace}/{name}"]) == {"put", "get", "delete"}
    assert "post" in paths["/v1/adapters/{namespace}/{name}/distill"]
    assert "delete" in paths["/v1/adapters/{namespace}/{name}/cache"]
    assert "get" in paths["/v1/adapters/{namespace}/{name}/export"]
    assert "get" in paths["/v1/cache"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    anonymous.close()


def test_miss_hit_hit_then_evict_then_miss(trainer: live.LiveTrainer) -> None:
    c = trainer.client()
    created = c.put("/v1/adapters/team-a/alice", json=payloads.init_body())
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 0
    again = c.put("/v1/adapters/team-a/alice", json=payloads.init_body())
    assert again.status_code == 200

    url = "/v1/adapters/team-a/alice/distill"
    first = c.post(url, json=payloads.distill_body())
    assert first.status_code == 200, first.text
    assert (first.json()["version"], first.json()["cache"]) == (1, "miss")
    reads_warm = trainer.metrics()[(READ_BYTES, ())]
    for version in (2, 3):
        r = c.post(url, json=payloads.distill_body())
        assert (r.json()["version"], r.json()["cache"]) == (version, "hit")
        assert set(r.json()["timing_ms"]) == {"queue", "restore", "compute", "snapshot", "persist", "total"}
        assert set(r.json()["metrics"]) >= {"total_loss", "distill_loss", "grad_norm", "tokens_processed"}
    assert trainer.metrics()[(READ_BYTES, ())] == reads_warm, "a warm step read adapter storage"

    state = c.get("/v1/adapters/team-a/alice").json()
    assert state["version"] == 3 and state["cached"] is True and state["cache_bytes"] > 0
    assert "team-a/alice" in [e["adapter"] for e in c.get("/v1/cache").json()["entries"]]

    assert c.delete("/v1/adapters/team-a/alice/cache").json() == {"evicted": True}
    assert c.delete("/v1/adapters/team-a/alice/cache").json() == {"evicted": False}  # idempotent
    assert c.get("/v1/adapters/team-a/alice").json()["cached"] is False
    cold = c.post(url, json=payloads.distill_body())
    assert (cold.json()["version"], cold.json()["cache"]) == (4, "miss")
    assert trainer.metrics()[(READ_BYTES, ())] > reads_warm
    explicit = ("lorafleet_trainer_cache_evictions_total", (("reason", "explicit"),))
    assert trainer.metrics()[explicit] >= 1


# PEFT 0.21 reads a property that transformers 5.24 deprecated; the warning is theirs, not ours.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_export_loads_with_peft(trainer: live.LiveTrainer, model_cache: Path, tmp_path: Path) -> None:
    import peft
    import torch

    from lorafleet_trainer.models import models

    c = trainer.client()
    assert c.put("/v1/adapters/team-a/exported", json=payloads.init_body()).status_code == 201
    for _ in range(2):
        assert c.post("/v1/adapters/team-a/exported/distill", json=payloads.distill_body()).status_code == 200
    r = c.get("/v1/adapters/team-a/exported/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert set(zf.namelist()) == {"adapter_config.json", "adapter_model.safetensors"}
        zf.extractall(tmp_path / "adapter")

    base, _ = models.load("builtin:tiny", model_cache)
    ids = torch.tensor([[5, 9, 14, 31, 7]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    lora_a = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_a and all(("q_proj" in n or "v_proj" in n) for n in lora_a)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.equal(before, after), "the trained adapter did not change the model's output"


def test_each_version_has_an_artifact_and_exports_by_version(trainer: live.LiveTrainer) -> None:
    c = trainer.client()
    route = "/v1/adapters/team-a/versioned"
    assert c.put(route, json=payloads.init_body()).status_code == 201
    answers = [c.post(f"{route}/distill", json=payloads.distill_body()).json() for _ in range(2)]
    for version, answer in zip((1, 2), answers, strict=True):
        assert re.fullmatch(rf"team-a/\.versioned\.v{version:08d}-[0-9a-f]{{12}}", answer["artifact"])
    assert c.get(route).json()["artifact"] == answers[-1]["artifact"]
    # Version 1 is still served from its own directory, byte for byte, while version 2 is the latest.
    r = c.get(f"{route}/export", params={"version": 1})
    assert r.status_code == 200 and "versioned-v1.zip" in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        on_disk = trainer.storage / answers[0]["artifact"] / "adapter_model.safetensors"
        assert zf.read("adapter_model.safetensors") == on_disk.read_bytes()
    missing = c.get(f"{route}/export", params={"version": 9})
    assert missing.status_code == 404 and missing.json()["error"].startswith("version: ")
    assert "no version 9" in missing.json()["error"]
    assert c.get(f"{route}/export", params={"version": -1}).status_code == 422


def _raw(body: dict[str, Any], literal: str) -> str:
    """JSON text with the string "@" replaced by ``literal`` (NaN and Infinity are not JSON)."""
    return json.dumps(body).replace('"@"', literal)


def _bad_requests() -> list[Any]:
    sample = payloads.sample()
    d = payloads.distill_body
    return [
        pytest.param("put", "/v1/adapters/Team-A/bob", payloads.init_body(), 422, "namespace", id="upper-ns"),
        pytest.param("put", "/v1/adapters/team-a/-bob", payloads.init_body(), 422, "name", id="dash-name"),
        pytest.param("put", "/v1/adapters/team-a/%2e%2e", payloads.init_body(), 422, "name", id="dotdot"),
        pytest.param("post", "/v1/adapters/%2e%2e/bob/distill", d(), 422, "namespace", id="dotdot-ns"),
        pytest.param("put", "/v1/adapters/team-a/a%2Fb", payloads.init_body(), 404, "path", id="slash"),
        pytest.param("put", "/v1/adapters/team-a/" + "b" * 64, payloads.init_body(), 422, "name", id="long"),
        pytest.param("post", "/v1/adapters/team-a/bob/distill", {"samples": []}, 422, "samples", id="empty"),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            {"samples": [{**sample, "response_logprobs": [-1.0]}]},
            422,
            "samples[0].response_logprobs",
            id="logprob-length",
        ),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            {"samples": [{**sample, "response_token_ids": [1, 2, 3, 10**6]}]},
            422,
            "samples[0].response_token_ids[3]",
            id="vocab",
        ),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            _raw({"samples": [{**sample, "response_logprobs": "@"}]}, "[NaN, -1, -1, -1]"),
            422,
            "samples[0].response_logprobs[0]",
            id="nan",
        ),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            _raw({"samples": [sample], "training": {"learning_rate": "@"}}, "Infinity"),
            422,
            "training.learning_rate",
            id="infinity",
        ),
        pytest.param(
            "post", "/v1/adapters/team-a/bob/distill", d(alpha=2.0), 422, "training.alpha", id="alpha-range"
        ),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            {"samples": [{**sample, "mood": "happy"}]},
            422,
            "samples[0].mood",
            id="unknown-field",
        ),
        pytest.param("post", "/v1/adapters/team-a/bob/distill", "{not json", 422, "body", id="bad-json"),
        pytest.param("post", "/v1/adapters/team-a/nobody/distill", d(), 404, "adapter", id="unknown"),
        pytest.param("get", "/v1/adapters/team-a/nobody", None, 404, "adapter", id="unknown-get"),
        pytest.param(
            "put", "/v1/adapters/team-a/bob", payloads.init_body(rank=4), 409, "lora", id="conflict"
        ),
        pytest.param(
            "put", "/v1/adapters/team-a/bob", {"lora": {"rank": "8"}}, 422, "lora.rank", id="rank-str"
        ),
        pytest.param(
            "put",
            "/v1/adapters/team-a/bob",
            payloads.init_body(target_modules=["nonexistent_proj"]),
            422,
            "lora.target_modules[0]",
            id="bad-module",
        ),
        pytest.param(
            "post", "/v1/adapters/team-a/bob/distill", d(n=700, prompt_len=40), 413, "body", id="big"
        ),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            {**d(), "idempotency_key": "two words"},
            422,
            "idempotency_key",
            id="key-pattern",
        ),
        pytest.param(
            "post",
            "/v1/adapters/team-a/bob/distill",
            {**d(n=2), "idempotency_key": BOB_KEY},
            409,
            "idempotency_key",
            id="key-reused",
        ),
    ]


@pytest.fixture(scope="module")
def bob(trainer: live.LiveTrainer) -> None:
    """A trained, cached adapter that the bad requests aim at."""
    c = trainer.client()
    assert c.put("/v1/adapters/team-a/bob", json=payloads.init_body()).status_code == 201
    body = {**payloads.distill_body(), "idempotency_key": BOB_KEY}
    assert c.post("/v1/adapters/team-a/bob/distill", json=body).status_code == 200


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), _bad_requests())
def test_bad_input_names_the_field_and_changes_nothing(
    trainer: live.LiveTrainer, bob: None, method: str, path: str, body: Any, status: int, field: str
) -> None:
    before = snapshot(trainer)
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    headers = {"content-type": "application/json"} if content is not None else {}
    r = trainer.client().request(method, path, content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    answer = wire.Error.model_validate(r.json())
    assert answer.error.startswith(f"{field}: "), answer.error
    assert answer.field == field, answer  # the field itself, for clients that act on it
    assert snapshot(trainer) == before
    assert trainer.client().get("/v1/adapters/team-a/bob").json()["version"] == 1


def test_auth_is_required_on_v1_and_probes_stay_open(trainer: live.LiveTrainer, bob: None) -> None:
    before = snapshot(trainer)
    calls = [
        ("get", "/v1/adapters/team-a/bob", None),
        ("put", "/v1/adapters/team-a/carol", payloads.init_body()),
        ("post", "/v1/adapters/team-a/bob/distill", payloads.distill_body()),
        ("delete", "/v1/adapters/team-a/bob/cache", None),
        ("delete", "/v1/adapters/team-a/bob", None),
        ("get", "/v1/adapters/team-a/bob/export", None),
        ("get", "/v1/cache", None),
    ]
    for token in ("", "wrong-token", TOKEN + "x", TOKEN[:-1]):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=trainer.base_url, headers=headers) as c:
            for method, path, body in calls:
                r = c.request(method, path, json=body)
                assert r.status_code == 401, (token, method, path, r.text)
                assert r.json()["error"].startswith("authorization: ")
                assert r.headers["www-authenticate"] == "Bearer"
            for probe in ("/healthz", "/readyz", "/metrics"):
                assert c.get(probe).status_code == 200
    assert snapshot(trainer) == before
    assert not (trainer.storage / "team-a" / "carol").exists()


def test_init_can_pin_and_unpin_the_cache_entry(trainer: live.LiveTrainer) -> None:
    c = trainer.client()
    body = {**payloads.init_body(), "cache": {"pinned": True}}
    assert c.put("/v1/adapters/team-a/pinned", json=body).status_code == 201
    assert c.post("/v1/adapters/team-a/pinned/distill", json=payloads.distill_body()).status_code == 200

    def pinned() -> bool:
        entries = {e["adapter"]: e for e in c.get("/v1/cache").json()["entries"]}
        return bool(entries["team-a/pinned"]["pinned"])

    assert pinned()
    assert c.put("/v1/adapters/team-a/pinned", json={**body, "cache": {"pinned": False}}).status_code == 200
    assert not pinned()


def test_a_retried_step_is_answered_again_not_applied_twice(trainer: live.LiveTrainer) -> None:
    c = trainer.client()
    assert c.put("/v1/adapters/team-a/carol", json=payloads.init_body()).status_code == 201
    url = "/v1/adapters/team-a/carol/distill"
    body = {**payloads.distill_body(), "idempotency_key": "chat-41/feedback"}
    first = wire.DistillResponse.model_validate(c.post(url, json=body).json())
    replayed_before = trainer.metrics().get(REPLAYED, 0.0)
    retry = c.post(url, json=body)
    assert retry.status_code == 200, retry.text
    again = wire.DistillResponse.model_validate(retry.json())
    assert (first.version, first.replayed) == (1, False)
    assert (again.version, again.artifact, again.metrics, again.replayed) == (
        1,
        first.artifact,
        first.metrics,
        True,
    )
    assert c.get("/v1/adapters/team-a/carol").json()["version"] == 1
    assert trainer.metrics()[REPLAYED] == replayed_before + 1
    # Without a key the same body is a new step.
    assert c.post(url, json=payloads.distill_body()).json()["version"] == 2


def test_changes_name_each_commit_for_the_operator_to_follow(trainer: live.LiveTrainer) -> None:
    c = trainer.client()
    first = wire.Changes.model_validate(c.get("/v1/changes").json())  # no instance yet: just the number
    assert first.adapters == []
    assert c.put("/v1/adapters/team-a/dave", json=payloads.init_body()).status_code == 201
    query = {"since": first.seq, "instance": first.instance, "wait": 0}
    created = wire.Changes.model_validate(c.get("/v1/changes", params=query).json())
    assert [(a.name, a.version) for a in created.adapters] == [("dave", 0)] and created.seq > first.seq
    # A follower waiting for the next change gets it when the step commits.
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            c.get, "/v1/changes", params={"since": created.seq, "instance": first.instance, "wait": 60}
        )
        assert c.post("/v1/adapters/team-a/dave/distill", json=payloads.distill_body()).status_code == 200
        stepped = wire.Changes.model_validate(waiting.result(timeout=120).json())
    assert [(a.name, a.version) for a in stepped.adapters] == [("dave", 1)]
    assert stepped.adapters[0].artifact.startswith("team-a/.dave.v00000001-")
    assert c.get("/v1/changes", params={"since": -1}).status_code == 422
