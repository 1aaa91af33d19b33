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


def test_single_and_batch_bodies_parse() -> None:
    (one,) = claas.items(SINGLE)
    assert one.lora_id == "team-a/alice" and one.training is not None
    assert one.training.overrides().teacher_top_k == 100
    two = claas.items(BATCH)
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
    ],
)
def test_bad_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        claas.items(body)


def test_a_training_value_past_lorafleets_bounds_is_named() -> None:
    (item,) = claas.items({**SINGLE, "training": {"alpha": 2.0}})
    assert item.training is not None
    with pytest.raises(ValidationError, match="alpha"):
        item.training.overrides()
