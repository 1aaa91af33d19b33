"""LoraSpec and TrainingSpec: parsing, defaults, and errors that name the field."""

from __future__ import annotations

import math

import pytest

from lorafleet_trainer.errors import InvalidInput
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec


def test_lora_round_trip_and_order_free_shape() -> None:
    spec = LoraSpec.from_dict({"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["v_proj", "q_proj"]})
    assert spec.target_modules == ("v_proj", "q_proj")
    assert spec.to_dict() == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["v_proj", "q_proj"]}
    assert LoraSpec(rank=4, alpha=8, dropout=0.1, target_modules=("v_proj", "q_proj")) == spec
    assert LoraSpec.from_dict(spec.to_dict()) == spec
    assert (
        spec.shape_key()
        == LoraSpec.from_dict({**spec.to_dict(), "target_modules": ["q_proj", "v_proj"]}).shape_key()
    )
    assert spec.shape_key() != LoraSpec.from_dict({**spec.to_dict(), "rank": 8}).shape_key()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rank": 0}, "lora.rank"),
        ({"rank": True}, "lora.rank"),
        ({"rank": 2.5}, "lora.rank"),
        ({"alpha": -1}, "lora.alpha"),
        ({"alpha": math.nan}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"target_modules": []}, "lora.target_modules"),
        ({"target_modules": "q_proj"}, "lora.target_modules"),
        ({"target_modules": ["q_proj", "../x"]}, "lora.target_modules[1]"),
        ({"target_modules": ["q_proj", "q_proj"]}, "lora.target_modules"),
        ({"targetModules": ["q_proj"]}, "lora.targetModules"),  # an unknown field is named itself
    ],
)
def test_lora_rejects_naming_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        LoraSpec.from_dict(body)
    assert err.value.field == field


def test_training_merge_layers_and_validates() -> None:
    base = TrainingSpec().merged({"learning_rate": 3e-5, "teacher_top_k": 10})
    assert base.learning_rate == 3e-5 and base.teacher_top_k == 10 and base.alpha == TrainingSpec().alpha
    again = base.merged({"alpha": 1})
    assert again.alpha == 1.0 and again.learning_rate == 3e-5
    assert base.merged(None) is base
    assert TrainingSpec.from_dict(again.to_dict()) == again


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"learning_rate": 0}, "training.learning_rate"),
        ({"learning_rate": math.inf}, "training.learning_rate"),
        ({"alpha": 1.5}, "training.alpha"),
        ({"is_clip": 0}, "training.is_clip"),
        ({"max_grad_norm": "1"}, "training.max_grad_norm"),
        ({"kl_reg_weight": -0.1}, "training.kl_reg_weight"),
        ({"teacher_top_k": 0}, "training.teacher_top_k"),
        ({"lr": 1e-3}, "training.lr"),
        ({"is_floor": 1.5}, "training.is_floor"),
        ({"is_floor": 0.9, "is_clip": 0.5}, "training.is_floor"),
        ({"teacher_template": "polite"}, "training.teacher_template"),
        ({"teacher_template": 3}, "training.teacher_template"),
        ({"teacher_template": "custom"}, "training.teacher_custom_template"),
        (
            {"teacher_template": "custom", "teacher_custom_template": "{question}"},
            "training.teacher_custom_template",
        ),
        ({"teacher_custom_template": "x" * 8193}, "training.teacher_custom_template"),
    ],
)
def test_training_rejects_naming_field(body: dict[str, object], field: str) -> None:
    spec = TrainingSpec()
    with pytest.raises(InvalidInput) as err:
        spec.merged(body)
    assert err.value.field == field
    assert spec == TrainingSpec()


def test_training_defaults_are_the_crds() -> None:
    """One field contract: the engine's defaults are the CRD's (lorafleet_api.fields), on every path."""
    from lorafleet_api.fields import TRAINING

    spec = TrainingSpec()
    for key, limit in TRAINING.items():
        assert getattr(spec, key) == limit.default, key


def test_custom_template_may_come_from_the_adapter_and_the_request() -> None:
    stored = TrainingSpec().merged({"teacher_custom_template": "{feedback}\n\n{question}"})
    assert stored.teacher_template != "custom"
    assert stored.merged({"teacher_template": "custom"}).teacher_template == "custom"
