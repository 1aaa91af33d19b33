"""The sampling routes over real HTTP (builtin:tiny): what they answer, how they are ordered with the
adapter's steps, that their answer is a ready distill sample, and how they refuse bad input."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.trainer.service import live, payloads
from tests.trainer.service.test_service_http import snapshot

PROMPT = [72, 105, 33, 32, 87, 104, 97, 116]  # byte ids of "Hi! What"
DEPTH = ("lorafleet_trainer_queue_depth", ())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[live.LiveTrainer]:
    workdir = tmp_path_factory.mktemp("generate")
    holds = workdir / "holds"
    holds.mkdir()
    trainer = live.start_trainer(
        workdir,
        model_cache_dir=model_cache,
        args=["--max-generate-tokens", "16", "--test-hold-dir", str(holds)],
    )
    yield trainer
    trainer.stop()


@pytest.fixture(scope="module")
def ann(server: live.LiveTrainer) -> str:
    """An adapter trained one step, so its answers differ from the base model's."""
    c = server.client()
    assert c.put("/v1/adapters/gen/ann", json=payloads.init_body()).status_code == 201
    assert c.post("/v1/adapters/gen/ann/distill", json=payloads.distill_body()).status_code == 200
    return "/v1/adapters/gen/ann"


def generate(server: live.LiveTrainer, path: str, **body: Any) -> dict[str, Any]:
    r = server.client().post(path, json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_base_model_answer_is_a_ready_distill_sample(server: live.LiveTrainer) -> None:
    out = generate(server, "/v1/generate", prompt_token_ids=PROMPT, max_tokens=12)
    assert out["adapter"] is None and out["version"] is None and out["cache"] is None
    n = len(out["token_ids"])
    assert 1 <= n <= 12 and len(out["logprobs"]) == n
    assert out["finish_reason"] == ("length" if n == 12 else "stop")
    assert all(lp <= 0.0 for lp in out["logprobs"])
    assert out["prompt_token_ids"] == PROMPT
    sample = out["sample"]
    assert sample["prompt_token_ids"] == PROMPT
    assert sample["response_token_ids"] == out["token_ids"]
    assert sample["response_logprobs"] == out["logprobs"]
    assert sample["response"] == out["text"]
    # Greedy decoding answers the same every time.
    assert (
        generate(server, "/v1/generate", prompt_token_ids=PROMPT, max_tokens=12)["token_ids"]
        == out["token_ids"]
    )


def test_seeded_sampling_repeats_and_reports_its_seed(server: live.LiveTrainer) -> None:
    body = {"prompt_token_ids": PROMPT, "max_tokens": 16, "temperature": 1.5}
    first = generate(server, "/v1/generate", **body, seed=7)
    assert first["seed"] == 7
    assert generate(server, "/v1/generate", **body, seed=7)["token_ids"] == first["token_ids"]
    others = {tuple(generate(server, "/v1/generate", **body, seed=s)["token_ids"]) for s in range(8, 12)}
    assert others - {tuple(first["token_ids"])}, "no other seed sampled anything else"
    drawn = generate(server, "/v1/generate", **body)
    again = generate(server, "/v1/generate", **body, seed=drawn["seed"])
    assert again["token_ids"] == drawn["token_ids"]


def test_chat_messages_go_through_the_chat_template(server: live.LiveTrainer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    out = generate(server, "/v1/generate", messages=messages, max_tokens=4)
    rendered = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out["sample"]["prompt"] == rendered
    # What the teacher of a distill step reads: the last user turn and the system prompt.
    assert out["sample"]["user_prompt"] == "Why?"
    assert out["sample"]["system_prompt"] == "Be brief."


def test_adapter_answers_with_its_current_version_and_its_rollout_trains_on_policy(
    server: live.LiveTrainer, ann: str
) -> None:
    c = server.client()
    base = generate(server, "/v1/generate", prompt_token_ids=PROMPT, max_tokens=8)
    out = generate(server, f"{ann}/generate", prompt_token_ids=PROMPT, max_tokens=8)
    assert out["adapter"] == "gen/ann" and out["version"] == 1 and out["cache"] == "hit"
    assert out["logprobs"] != base["logprobs"]  # the trained adapter answers, not the base model
    assert c.delete(f"{ann}/cache").json() == {"evicted": True}
    again = generate(server, f"{ann}/generate", prompt_token_ids=PROMPT, max_tokens=8)
    assert again["cache"] == "miss" and again["version"] == 1
    assert again["token_ids"] == out["token_ids"] and again["logprobs"] == pytest.approx(
        out["logprobs"], abs=1e-6
    )
    # generate -> feedback -> distill: the rollout's logprobs are the student's own, ratio 1.
    step = c.post(
        f"{ann}/distill", json={"samples": [{**out["sample"], "feedback": "Say it in fewer words."}]}
    )
    assert step.status_code == 200, step.text
    assert step.json()["version"] == 2
    assert step.json()["metrics"]["mean_is_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert generate(server, f"{ann}/generate", prompt_token_ids=PROMPT, max_tokens=8)["version"] == 2


def test_a_generate_waits_for_the_step_queued_before_it(server: live.LiveTrainer, ann: str) -> None:
    holds = server.log_path.parent / "holds"
    version = server.client().get(ann).json()["version"]
    (holds / "compute").touch()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            step = pool.submit(server.client().post, f"{ann}/distill", json=payloads.distill_body())
            while not (holds / "compute.held").exists():
                assert step.running() or not step.done(), step.result().text
                time.sleep(0.01)
            body = {"prompt_token_ids": PROMPT, "max_tokens": 4}
            answer = pool.submit(server.client().post, f"{ann}/generate", json=body)
            while server.metrics()[DEPTH] != 1:  # the generate waits behind the held step
                assert not answer.done(), answer.result().text
                time.sleep(0.01)
            (holds / "compute").unlink()
            assert step.result().json()["version"] == version + 1
            assert answer.result().json()["version"] == version + 1
    finally:
        (holds / "compute").unlink(missing_ok=True)


def _bad() -> list[Any]:
    g = "/v1/generate"
    return [
        pytest.param(g, {"max_tokens": 4}, 422, "messages", id="no-prompt"),
        pytest.param(
            g,
            {"prompt_token_ids": PROMPT, "messages": [{"role": "user", "content": "x"}]},
            422,
            "messages",
            id="both",
        ),
        pytest.param(g, {"prompt_token_ids": PROMPT, "max_tokens": 17}, 422, "max_tokens", id="over-bound"),
        pytest.param(g, {"prompt_token_ids": PROMPT, "max_tokens": 0}, 422, "max_tokens", id="zero"),
        pytest.param(g, {"prompt_token_ids": [1, 2, 10**6]}, 422, "prompt_token_ids[2]", id="vocab"),
        pytest.param(g, {"prompt_token_ids": []}, 422, "prompt_token_ids", id="empty"),
        pytest.param(
            g, {"prompt_token_ids": PROMPT, "temperature": -1.0}, 422, "temperature", id="negative-temp"
        ),
        pytest.param(g, {"prompt_token_ids": PROMPT, "seed": "1"}, 422, "seed", id="seed-str"),
        pytest.param(
            g, {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role", id="bad-role"
        ),
        pytest.param(g, {"prompt_token_ids": PROMPT, "top_p": 0.9}, 422, "top_p", id="unknown-field"),
        pytest.param(
            "/v1/adapters/gen/nobody/generate", {"prompt_token_ids": PROMPT}, 404, "adapter", id="unknown"
        ),
        pytest.param(
            "/v1/adapters/Gen/ann/generate", {"prompt_token_ids": PROMPT}, 422, "namespace", id="bad-ns"
        ),
    ]


@pytest.mark.parametrize(("path", "body", "status", "field"), _bad())
def test_bad_input_names_the_field_and_changes_nothing(
    server: live.LiveTrainer, ann: str, path: str, body: dict[str, Any], status: int, field: str
) -> None:
    before = snapshot(server)
    r = server.client().post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(f"{field}: "), r.json()
    assert snapshot(server) == before


def test_the_routes_are_in_the_openapi_schema(server: live.LiveTrainer) -> None:
    paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    assert "post" in paths["/v1/adapters/{namespace}/{name}/generate"]
    assert "post" in paths["/v1/generate"]
