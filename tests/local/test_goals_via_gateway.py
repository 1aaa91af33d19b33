"""The goals loop through the gateway, against a scripted stand-in for the gateway's two routes.

The stand-in answers as the gateway does (the version headers, CLaaS answers with one result per
step, 401/404 error bodies), so these check what the client sends and how it counts versions in
seconds; tests/serving/test_gateway_goals.py runs the same loop through the real gateway, trainer
and vLLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from lorafleet_local import gateway_client, goals, verifiers

MODEL = "team-a/alice"
SUITE = verifiers.Suite.parse(
    {
        "name": "brief",
        "kind": "brevity",
        "feedback": "Answer in one short sentence.",
        "system_prompt": "",
        "max_tokens": 12,
        "train": ["What is the capital of Italy?", "Who wrote Hamlet?"],
        "held_out": [{"question": "What is the capital of France?", "fact": ["paris"]}],
        "verifier": {"kind": "max_words", "max": 12},
    }
)
GOAL = goals.Goal("alice", SUITE, steps=2)


@dataclasses.dataclass
class StandIn:
    """The gateway's chat and feedback routes over one adapter whose version each step raises."""

    token: str = "tok-a"
    version: int = 0
    choices_per_chat: int | None = None  # None: as many as ``n`` asks
    steps_per_item: bool = False  # make one step per item instead of one per batch
    stale_chats: int = 0  # the next this many chats are answered by the version before
    calls: list[tuple[str, Any, Mapping[str, str]]] = dataclasses.field(default_factory=list)
    keys: dict[str, int] = dataclasses.field(default_factory=dict)

    def __call__(self, url: str, body: Any, headers: Mapping[str, str]) -> tuple[int, dict[str, str], Any]:
        self.calls.append((url.rsplit("/v1/", 1)[1], body, headers))
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {}, {"error": "Authorization: the token is not known", "field": "Authorization"}
        model = body.get("model") or body["requests"][0]["lora_id"]
        if model != MODEL:
            return 404, {}, {"error": f"model: no adapter is named {model!r}", "field": "model"}
        if url.endswith("/chat/completions"):
            stale = self.stale_chats > 0
            self.stale_chats -= 1
            version = self.version - 1 if stale else self.version
            n = body.get("n", 1) if self.choices_per_chat is None else self.choices_per_chat
            choices = [{"index": i, "message": {"content": f"v{version} answer {i}"}} for i in range(n)]
            head = {"x-lorafleet-adapter-version": str(version), "x-lorafleet-latest": str(not stale).lower()}
            return 200, head, {"id": f"chat-{len(self.calls)}", "choices": choices}
        key = headers["Idempotency-Key"]
        replayed = key in self.keys
        if not replayed:
            self.keys[key] = self.version
        steps = len(body["requests"]) if self.steps_per_item else 1
        first = self.keys[key]
        results = [
            {"lora_id": MODEL, "version": first + i + 1, "replayed": replayed, "samples": ["record:0"],
             "distill_result": {"metadata": {"distill_loss": 0.5}}}
            for i in range(steps)
        ]  # fmt: skip
        if not replayed:
            self.version += steps
        return 200, {}, {"status": "ok", "version": results[0]["version"], "results": results}


def client(stand_in: StandIn, model: str = MODEL, token: str = "tok-a") -> gateway_client.GatewayClient:
    return gateway_client.GatewayClient("http://gw/", model, token, send=stand_in)


def test_each_step_chats_n_answers_per_question_then_sends_one_keyed_batch() -> None:
    gw = StandIn()
    run = goals.run_goal_gateway(client(gw), GOAL, key="k", seed=3)
    routes = [route for route, _, _ in gw.calls]
    # 1 held-out chat, then per step one chat per training question and one feedback; 1 held-out chat.
    assert routes == ["chat/completions", *(["chat/completions"] * 2 + ["feedback"]) * 2, "chat/completions"]
    held_out = gw.calls[0][1]
    assert held_out["temperature"] == 0.0 and held_out["max_tokens"] == 12 and held_out["n"] == 1
    rollouts = [body for route, body, _ in gw.calls[1:3]]
    assert all(b["n"] == 2 and b["temperature"] == 1.0 and b["model"] == MODEL for b in rollouts)
    batches = [(body, headers) for route, body, headers in gw.calls if route == "feedback"]
    assert [h["Idempotency-Key"] for _, h in batches] == ["goals-k-1", "goals-k-2"]
    items = batches[0][0]["requests"]
    assert len(items) == 4 and {i["feedback"] for i in items} == {SUITE.feedback}
    assert [i["prompt"] for i in items] == [SUITE.train[0]] * 2 + [SUITE.train[1]] * 2
    # Each answer is named as the gateway recorded it: the chat's id and the choice's index.
    assert [i["completion_id"] for i in items] == ["chat-2:0", "chat-2:1", "chat-3:0", "chat-3:1"]
    assert [i["response"] for i in batches[1][0]["requests"]][:1] == ["v1 answer 0"]  # v1's own rollouts
    assert [(s.answered_by, s.before, s.result.version, s.new_versions) for s in run.gateway_steps] == [
        (0, 0, 1, 1),
        (1, 1, 2, 1),
    ]
    assert run.version == 2 and [c.version for c in run.checkpoints] == [0, 2] and run.preview == {}
    assert run.losses == [0.5, 0.5] and "note" not in goals.gateway_step_line(run)


def test_a_server_that_gives_fewer_choices_is_asked_again() -> None:
    gw = StandIn(choices_per_chat=1)
    chat = client(gw).chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=1.0, n=3, seed=7)
    assert len(chat.texts) == 3 and [body["n"] for _, body, _ in gw.calls] == [3, 2, 1]
    assert [body["seed"] for _, body, _ in gw.calls] == [7, 8, 9]


def test_versions_are_counted_from_the_answer_when_a_batch_becomes_several_steps() -> None:
    gw = StandIn(steps_per_item=True)
    run = goals.run_goal_gateway(client(gw), dataclasses.replace(GOAL, steps=1), key="k")
    step = run.gateway_steps[0]
    assert (step.result.steps, step.result.version, step.new_versions, run.version) == (4, 4, 4, 4)
    assert "4 new versions, not 1" in goals.gateway_step_line(run)


def test_an_answer_from_an_older_version_is_reported() -> None:
    gw = StandIn()
    run = goals.GoalRun(GOAL, version=1)
    gw.version, gw.stale_chats = 1, 1  # the first rollout chat after v1 is answered by v0
    goals.step_chats(client(gw), run, "k")
    assert run.gateway_steps[0].answered_by == 0
    assert "the gateway answered with v0, older than v1" in goals.gateway_step_line(run)


def test_a_retried_key_is_reported_as_replayed() -> None:
    gw = StandIn()
    gw.keys["goals-k-1"] = 0
    gw.version = 1
    run = goals.run_goal_gateway(client(gw), dataclasses.replace(GOAL, steps=1), key="k")
    assert run.gateway_steps[0].result.replayed and "replayed" in goals.gateway_step_line(run)


def test_a_wrong_token_and_an_unknown_adapter_are_named() -> None:
    with pytest.raises(gateway_client.GatewayError, match=r"refused the call with this token \(401.*--token"):
        goals.run_goal_gateway(client(StandIn(), token="wrong"), GOAL)
    with pytest.raises(gateway_client.GatewayError, match=r"knows no adapter 'team-a/nobody' \(404"):
        goals.run_goal_gateway(client(StandIn(), model="team-a/nobody"), GOAL)
    with pytest.raises(ValueError, match="NAMESPACE/ADAPTER, not 'alice'"):
        client(StandIn(), model="alice")


def test_the_cli_wants_the_adapter_as_namespace_and_name(capsys: pytest.CaptureFixture[str]) -> None:
    goal = str(goals.GOALS / "alice.json")
    with pytest.raises(SystemExit) as exited:
        goals.main(["--gateway", "http://127.0.0.1:9", "alice", goal])
    assert exited.value.code == 2 and "NAMESPACE/ADAPTER, not 'alice'" in capsys.readouterr().err
    # Nothing listens on port 9: the error names the gateway, and the exit status says it failed.
    assert goals.main(["--gateway", "http://127.0.0.1:9", "team-a/alice", goal]) == 2
    assert "the gateway at http://127.0.0.1:9 cannot be reached" in capsys.readouterr().err


def test_a_server_that_is_not_a_gateway_is_named() -> None:
    def vllm(url: str, body: Any, headers: Mapping[str, str]) -> tuple[int, dict[str, str], Any]:
        return 200, {}, {"id": "c", "choices": [{"index": 0, "message": {"content": "hi"}}]}

    plain = gateway_client.GatewayClient("http://vllm:8000", MODEL, send=vllm)
    with pytest.raises(gateway_client.GatewayError, match=r"names no adapter version .* a LoraFleet gateway"):
        plain.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
