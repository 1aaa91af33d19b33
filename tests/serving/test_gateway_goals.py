"""The goals CLI's loop through the gateway only, with a real vLLM and a real trainer (smollm2).

What a production user of the gateway does: greedy chats judge the held-out answers, each step's
rollouts are chats with OpenAI's ``n`` (vLLM gives every choice and the gateway records each),
one CLaaS batch of feedback on them becomes the step, and the next chats are answered by the
version it committed, as the ``X-LoraFleet-Adapter-Version`` header says. The gateway asks for a
bearer token, so the loop's token is checked too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.gateway import live_gateway
from tests.serving import live_vllm
from tests.serving.test_gateway_chat import LATEST_WAIT_SECONDS, published
from tests.trainer.service import live

from lorafleet_local import gateway_client, goals, verifiers

pytestmark = pytest.mark.vllm

NS, NAME = "team-a", "goals"  # an adapter of its own beside test_gateway_chat.py's
TOKEN = "tok-goals"
SUITE = verifiers.Suite.parse(
    {
        "name": "brief",
        "kind": "brevity",
        "feedback": "Answer in one short sentence of at most twelve words.",
        "system_prompt": "",
        "max_tokens": 12,
        "train": ["Who wrote Hamlet?"],
        "held_out": [
            {"question": "What is the capital of France?", "fact": ["paris"]},
            {"question": "What is the largest planet?", "fact": ["jupiter"]},
        ],
        "verifier": {"kind": "max_words", "max": 12},
    }
)
GOAL = goals.Goal(NAME, SUITE, steps=1, loop=goals.Loop(n=2))


@pytest.fixture(scope="module")
def gateway(
    real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    adapter = published(real_servers, NS, NAME)
    tokens = Path(tmp_path_factory.mktemp("gateway-goals")) / "tokens.json"
    tokens.write_text(json.dumps({TOKEN: [NS]}))
    wait = LATEST_WAIT_SECONDS
    with live_gateway.serving([adapter], tokens_file=tokens, latest_wait_seconds=wait) as (url, _):
        yield url


def test_one_goal_step_through_the_gateway_is_answered_by_its_version(
    gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = gateway_client.GatewayClient(gateway, f"{NS}/{NAME}", TOKEN)
    status = goals.main_gateway(client, GOAL)
    out = capsys.readouterr().out
    print(out)
    assert status in (0, 1)  # met or not: a step of a 135M model proves nothing either way
    # How the run went, read back from the printed lines and the run's own record.
    assert "teacher preview: skipped" in out
    assert "step  1  rollouts answered by v0  feedback (2 answers, 1 step) -> v1" in out
    assert "note:" not in out  # answered by the latest version each time, one new version per step
    assert "before (v0): follows" in out and "after  (v1): follows" in out
    assert ("goal achieved" in out) or ("goal not achieved" in out)


def test_the_loop_keeps_count_and_the_next_chats_come_from_the_new_version(gateway: str) -> None:
    client = gateway_client.GatewayClient(gateway, f"{NS}/{NAME}", TOKEN)
    start = client.chat(SUITE.messages(SUITE.train[0]), max_tokens=4, temperature=0.0).version
    run = goals.run_goal_gateway(client, GOAL, key="serving-test")
    (step,) = run.gateway_steps
    assert (step.answered_by, step.before, step.new_versions, step.result.steps) == (start, start, 1, 1)
    # Both answers came from the gateway's record of the chats (vLLM's own log-probs), not rescored.
    assert step.result.samples == [f"record:{start}"] * 2
    assert run.after.version == run.version == start + 1
    assert len(run.after.answers) == len(SUITE.held_out)


def test_a_wrong_token_and_an_unknown_adapter_are_refused_by_name(gateway: str) -> None:
    wrong = gateway_client.GatewayClient(gateway, f"{NS}/{NAME}", "not-a-token")
    with pytest.raises(gateway_client.GatewayError, match=r"refused the call with this token \(401"):
        goals.run_goal_gateway(wrong, GOAL)
    unknown = gateway_client.GatewayClient(gateway, f"{NS}/nobody", TOKEN)
    with pytest.raises(gateway_client.GatewayError, match=r"knows no adapter 'team-a/nobody' \(404"):
        goals.run_goal_gateway(unknown, GOAL)
