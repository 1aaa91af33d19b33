"""The LoraAdapter spec model (``lorafleet_api.adapters``) and its snake_case init request."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet_api import adapters, wire


def test_init_request_is_snake_case_with_epoch() -> None:
    spec = adapters.parse_spec(
        {"spec": {"pool": "demo", "lora": {"rank": 4, "targetModules": ["q_proj"]},
                  "training": {"learningRate": 1e-4, "teacherTopK": 20}}}
    )  # fmt: skip
    assert wire.init_request(spec, 3).model_dump(mode="json", exclude_none=True) == {
        "lora": {"rank": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]},
        "epoch": 3,
        "cache": {"pinned": False},
        "training": {"learning_rate": 1e-4, "teacher_top_k": 20},
    }


def test_defaults_and_no_training_key_when_unset() -> None:
    spec = adapters.parse_spec({"spec": {"pool": "demo"}})
    assert spec.deletion_policy == "Retain" and spec.cache.pinned is False
    assert wire.init_request(spec, 1).training is None
    pinned = adapters.parse_spec({"spec": {"pool": "demo", "cache": {"pinned": True}}})
    assert wire.init_request(pinned, 1).cache == adapters.CacheOptions(pinned=True)


def test_bad_spec_names_the_field() -> None:
    with pytest.raises(ValidationError, match="rank"):
        adapters.parse_spec({"spec": {"pool": "demo", "lora": {"rank": 0}}})
    with pytest.raises(ValidationError, match="pool"):
        adapters.parse_spec({"spec": {}})
