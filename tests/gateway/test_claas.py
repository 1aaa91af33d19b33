"""CLaaS's feedback bodies, as its clients send them, single and batch."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet_gateway import claas

# CLaaS's documented shapes: FeedbackItem, and FeedbackBatchRequest with its orchestration.
SINGLE = {
    "lora_id": "team-a/alice",
    "prompt": "How do I boil an egg?",
    "response": "Put it in boiling water for nine minutes.",
    "feedback": "Answer in one short sentence.",
    "training": {
        "learning_rate": 5e-5,
        "alpha": 0.5,
        "is_clip": 5.0,
        "max_grad_norm": 1.0,
        "kl_reg_weight": 0.001,
        "teacher_top_k": 100,
    },
}
BATCH = {
    "requests": [SINGLE, {**SINGLE, "response": "Boil it.", "training": {"learning_rate": 1e-4}}],
    "orchestration": {"sleep_before": True, "wake_after": True, "wake_on_failure": True, "sleep_level": 1},
}


def items(body: object, header_key: str | None = None) -> list[claas.FeedbackItem]:
    return claas.Feedback.parse(body, header_key).items


def test_single_and_batch_bodies_parse() -> None:
    (one,) = items(SINGLE)
    assert one.lora_id == "team-a/alice" and one.training is not None
    assert one.training.overrides().teacher_top_k == 100
    two = items(BATCH)
    assert [i.response for i in two] == [SINGLE["response"], "Boil it."]
    # Fields a client leaves out keep the adapter's settings: they are not CLaaS's defaults.
    assert two[1].training is not None
    assert two[1].training.overrides().given() == {"learning_rate": 1e-4}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**SINGLE, "feedback": ""}, "feedback"),
        ({k: v for k, v in SINGLE.items() if k != "response"}, "response"),
        ({**SINGLE, "extra": 1}, "extra"),
        ({"requests": []}, "requests"),
        ({**SINGLE, "training": {"learning_rate": "fast"}}, "learning_rate"),
        ({**SINGLE, "idempotency_key": "has space"}, "idempotency_key"),
        ({**SINGLE, "idempotency_key": "k" * 65}, "idempotency_key"),
    ],
)
def test_bad_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        items(body)


def test_a_training_value_past_lorafleets_bounds_is_named() -> None:
    (item,) = items({**SINGLE, "training": {"alpha": 2.0}})
    assert item.training is not None
    with pytest.raises(ValidationError, match="alpha"):
        item.training.overrides()


def test_the_idempotency_key_comes_from_the_header_or_the_body_once() -> None:
    assert claas.Feedback.parse(SINGLE, "retry-1").idempotency_key == "retry-1"
    assert claas.Feedback.parse({**SINGLE, "idempotency_key": "k1"}, None).idempotency_key == "k1"
    assert claas.Feedback.parse({**SINGLE, "idempotency_key": "k1"}, "k1").idempotency_key == "k1"
    assert claas.Feedback.parse(SINGLE, None).idempotency_key is None
    keyed_items = {"requests": [{**SINGLE, "idempotency_key": "b"}, {**SINGLE, "idempotency_key": "b"}]}
    assert claas.Feedback.parse(keyed_items, None).idempotency_key == "b"
    assert claas.Feedback.parse({**BATCH, "idempotency_key": "top"}, None).idempotency_key == "top"
    with pytest.raises(claas.KeyConflict, match="header"):
        claas.Feedback.parse({**SINGLE, "idempotency_key": "k1"}, "k2")
    with pytest.raises(claas.KeyConflict, match="one idempotency_key"):
        claas.Feedback.parse({"requests": [{**SINGLE, "idempotency_key": "a"}, SINGLE]}, None)
    with pytest.raises(ValidationError, match="idempotency_key"):
        claas.Feedback.parse(SINGLE, "a header with spaces")


def test_the_digest_is_of_what_the_client_asked() -> None:
    (one,) = items(SINGLE)
    (other,) = items({**SINGLE, "feedback": "Answer in French."})
    assert claas.digest("team-a/alice", [one]) == claas.digest("team-a/alice", [items(SINGLE)[0]])
    assert claas.digest("team-a/alice", [one]) != claas.digest("team-a/alice", [other])
    assert claas.digest("team-a/alice", [one]) != claas.digest("team-a/bob", [one])
