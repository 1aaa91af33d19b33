"""DistillSample parsing: every malformed field is named, nothing is coerced silently."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lorafleet_trainer.errors import InvalidInput
from lorafleet_trainer.learning.samples import DistillSample, parse_samples


def _body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "p",
        "response": "r",
        "feedback": "too long",
        "response_logprobs": [-0.7, -1.2],
        "prompt_token_ids": [5, 9, 14],
        "response_token_ids": [31, 7],
        "user_prompt": "u",
        "system_prompt": "s",
        "demonstration": "d",
    }
    body.update(over)
    return body


def test_round_trip() -> None:
    sample = DistillSample.from_dict(_body())
    assert sample.to_dict() == _body()
    defaulted = DistillSample.from_dict(
        {k: v for k, v in _body().items() if k not in ("user_prompt", "system_prompt", "demonstration")}
    )
    assert defaulted.user_prompt == "p" and defaulted.system_prompt == "" and defaulted.demonstration == ""


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"response_logprobs": [-0.7]}, "samples[0].response_logprobs"),
        ({"response_logprobs": [-0.7, math.nan]}, "samples[0].response_logprobs[1]"),
        ({"response_logprobs": [-0.7, 0.5]}, "samples[0].response_logprobs[1]"),
        ({"prompt_token_ids": []}, "samples[0].prompt_token_ids"),
        ({"prompt_token_ids": [1, -2]}, "samples[0].prompt_token_ids[1]"),
        ({"response_token_ids": [1, "2"]}, "samples[0].response_token_ids[1]"),
        ({"feedback": ""}, "samples[0].feedback"),
        ({"feedback": 3}, "samples[0].feedback"),
        ({"extra": 1}, "samples[0]"),
    ],
)
def test_rejects_naming_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        DistillSample.from_dict(_body(**over))
    assert err.value.field == field


def test_missing_required_field() -> None:
    body = _body()
    del body["response_token_ids"]
    with pytest.raises(InvalidInput) as err:
        DistillSample.from_dict(body)
    assert err.value.field == "samples[0].response_token_ids"


def test_parse_samples_names_the_index() -> None:
    with pytest.raises(InvalidInput) as err:
        parse_samples([_body(), _body(prompt_token_ids=[])])
    assert err.value.field == "samples[1].prompt_token_ids"
    with pytest.raises(InvalidInput) as err:
        parse_samples([])
    assert err.value.field == "samples"
    assert len(parse_samples([_body(), _body()])) == 2
