"""Chat and feedback through the gateway, with a real vLLM and a real trainer on the real model.

The trainer publishes the adapter's versions to vLLM itself (PUT /v1/serving); the gateway routes
each chat to the server that serves the adapter's latest version, says which version answered,
records what it served, and turns CLaaS-shaped feedback on that answer into a step from the record
(the behaviour log-probs vLLM reported). The next chat is answered by the new version, and its
text is the trainer's own greedy answer at that version.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.gateway import live_gateway
from tests.serving import live_vllm
from tests.trainer.service import live

from lorafleet_gateway.app import ADAPTER_HEADER, LATEST_HEADER, VERSION_HEADER
from lorafleet_gateway.directory import Adapter

pytestmark = pytest.mark.vllm

NS, NAME = "team-a", "gw"
QUESTION = "What is the capital of Italy?"
MESSAGES = [{"role": "user", "content": QUESTION}]
MAX_TOKENS = 16
LORA = {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def published(real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm], ns: str, name: str) -> Adapter:
    """A new adapter ``ns/name`` on the shared trainer, served by vLLM under ``name``, as the
    gateway's directory would list it. The trainer adds it to what it publishes; the adapters of
    the other suites stay published."""
    trainer, vllm = real_servers
    c = trainer.client(timeout=300)
    put = c.put(f"/v1/adapters/{ns}/{name}", json={"lora": LORA, "epoch": 1, "serving": {"name": name}})
    assert put.status_code == 201, put.text
    serving = {
        "servers": [{"name": "vllm-0", "url": vllm.base_url}],
        "adapters": [{"namespace": ns, "name": name, "served_name": name}],
    }
    assert c.put("/v1/serving", json=serving).status_code == 200
    return Adapter(ns, name, name, trainer.base_url, {"vllm-0": vllm.base_url})


# A bound long enough for a CPU vLLM's load: a chat after a step waits for the new version.
LATEST_WAIT_SECONDS = 120


@pytest.fixture(scope="module")
def gateway(real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm]) -> Iterator[str]:
    adapter = published(real_servers, NS, NAME)
    with live_gateway.serving([adapter], latest_wait_seconds=LATEST_WAIT_SECONDS) as (url, _):
        yield url


def chat(url: str, **extra: Any) -> httpx.Response:
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0.0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def trainers_answer(trainer: live.LiveTrainer) -> dict[str, Any]:
    r = trainer.client(timeout=300).post(
        f"/v1/adapters/{NS}/{NAME}/generate", json={"messages": MESSAGES, "max_tokens": MAX_TOKENS}
    )
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_feedback_on_a_served_answer_is_answered_by_the_next_version(
    gateway: str, real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm]
) -> None:
    trainer, _ = real_servers
    first = chat(gateway)
    assert first.status_code == 200, first.text
    assert (first.headers[ADAPTER_HEADER], first.headers[VERSION_HEADER]) == (f"{NS}/{NAME}", "0")
    assert first.headers[LATEST_HEADER] == "true"
    answer = first.json()
    text = answer["choices"][0]["message"]["content"]
    assert text == trainers_answer(trainer)["text"]
    # The gateway asked vLLM for log-probs and token ids; the client, who did not, gets neither.
    assert answer["choices"][0]["logprobs"] is None and "token_ids" not in answer["choices"][0]
    assert "prompt_token_ids" not in answer

    feedback = {"lora_id": f"{NS}/{NAME}", "prompt": QUESTION, "response": text}
    feedback["feedback"] = "Always answer in French."
    stepped = httpx.post(f"{gateway}/v1/feedback", json=feedback, timeout=300)
    assert stepped.status_code == 200, stepped.text
    assert stepped.json()["version"] == 1
    assert stepped.json()["results"][0]["samples"] == ["record:0"]  # vLLM's own log-probs, recorded

    after = chat(gateway, logprobs=True)
    assert after.status_code == 200, after.text
    assert after.headers[VERSION_HEADER] == "1" and after.headers[LATEST_HEADER] == "true"
    assert after.json()["choices"][0]["message"]["content"] == trainers_answer(trainer)["text"]
    assert after.json()["choices"][0]["logprobs"] is not None  # asked for: given


def test_an_unknown_model_is_404_and_the_models_list_names_the_adapter(gateway: str) -> None:
    missing = httpx.post(
        f"{gateway}/v1/chat/completions", json={"model": "nobody", "messages": MESSAGES}, timeout=60
    )
    assert missing.status_code == 404 and missing.json()["field"] == "model"
    cards = httpx.get(f"{gateway}/v1/models", timeout=60).json()["data"]
    assert [(c["id"], c["adapter"]) for c in cards] == [(NAME, f"{NS}/{NAME}")]


def test_streaming_passes_through_with_the_version(
    gateway: str, real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm]
) -> None:
    latest = real_servers[0].client().get(f"/v1/adapters/{NS}/{NAME}").json()["version"]
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers[VERSION_HEADER] == str(latest)
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
