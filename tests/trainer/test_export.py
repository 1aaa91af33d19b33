"""Stored and exported adapters are plain PEFT adapters: PEFT loaded with one gives the engine's answers."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tests.trainer.engine_helpers import samples

from lorafleet_trainer.engine import storage
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning import sampling
from lorafleet_trainer.learning.configs import LoraSpec
from lorafleet_trainer.models import models
from lorafleet_trainer.results import Generation

A = AdapterId("team-a", "alice")
LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("o_proj", "q_proj", "v_proj"))
IDS = [12, 40, 7, 99, 100, 101, 3, 64, 250, 31]


def _peft_model(model_dir: Path, adapter_dir: Path) -> Any:
    base, _ = models.load("builtin:tiny", model_dir)
    with warnings.catch_warnings():
        # PEFT 0.21 probes a transformers attribute that transformers 5.24 marks deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def _response_logits(model: Any, response: list[int]) -> torch.Tensor:
    """The logits predicting each token of ``response`` after IDS, in one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS + response])).logits[0].float()
    return logits[len(IDS) - 1 : -1]


def _agree(model: Any, answer: Generation) -> None:
    """``model`` gives the engine's greedy answer and its logprobs (one forward, no KV cache)."""
    logits = _response_logits(model, answer.token_ids)
    assert torch.argmax(logits, dim=-1).tolist() == answer.token_ids
    ours = torch.tensor(answer.logprobs)
    theirs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer.token_ids)[:, None])[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_stored_and_exported_adapter_match_the_engine(
    make_engine: Callable[..., Any], model_cache_dir: Path, tmp_path: Path
) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    for i in range(3):
        engine.distill(A, samples(i))
    prompt, greedy = sampling.Prompt(token_ids=tuple(IDS)), sampling.SamplingParams(max_tokens=8)
    answer = engine.generate(A, prompt, greedy)
    base, _ = models.load("builtin:tiny", model_cache_dir)
    plain = torch.log_softmax(_response_logits(base, answer.token_ids), dim=-1)
    moved = plain.gather(1, torch.tensor(answer.token_ids)[:, None])[:, 0] - torch.tensor(answer.logprobs)
    assert float(moved.abs().max()) > 1e-4  # the adapter changes the output

    _agree(_peft_model(model_cache_dir, engine.store.path(A)), answer)

    archive = zipfile.ZipFile(io.BytesIO(engine.export_zip(A)))
    assert sorted(archive.namelist()) == [storage.ADAPTER_CONFIG, storage.ADAPTER_WEIGHTS]
    config = json.loads(archive.read(storage.ADAPTER_CONFIG))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    out = tmp_path / "exported"
    archive.extractall(out)
    _agree(_peft_model(model_cache_dir, out), answer)


def test_builtin_generation_is_deterministic(model_cache_dir: Path, tmp_path: Path) -> None:
    first = Path(models.resolve("builtin:tiny", model_cache_dir))
    second = Path(models.resolve("builtin:tiny", tmp_path / "again"))
    assert first != second
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # A local directory loads through the same path as a builtin id.
    model, tokenizer = models.load(str(second))
    assert 3_000_000 < models.parameter_count(model) < 5_000_000
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_unknown_builtin_is_rejected(tmp_path: Path) -> None:
    from lorafleet_trainer.errors import InvalidInput

    with pytest.raises(InvalidInput) as err:
        models.resolve("builtin:huge", tmp_path)
    assert err.value.field == "base_model"


def test_each_kept_version_loads_by_path_with_its_own_weights(
    make_engine: Callable[..., Any], model_cache_dir: Path
) -> None:
    from lorafleet_trainer.engine.storage import VersionNotFound

    engine = make_engine(keep_versions=2, served_base_model_name="smollm2")
    engine.init_adapter(A, LORA, 1)
    greedy = sampling.SamplingParams(max_tokens=8)
    answers, artifacts = {}, {}
    for i in range(3):
        step = engine.distill(A, samples(i))
        answers[step.version] = engine.generate(A, sampling.Prompt(token_ids=tuple(IDS)), greedy)
        artifacts[step.version] = step.artifact
    assert all(artifacts[v].startswith(f"team-a/.alice.v{v:08d}-") for v in (1, 2, 3))
    assert engine.get_adapter(A).artifact == artifacts[3]
    root = engine.config.storage_root
    # Version 2 is still whole while 3 is the latest: PEFT loads it by path and answers as v2 did.
    for version in (2, 3):
        _agree(_peft_model(model_cache_dir, root / artifacts[version]), answers[version])
        archive = zipfile.ZipFile(io.BytesIO(engine.export_zip(A, version)))
        for name in (storage.ADAPTER_CONFIG, storage.ADAPTER_WEIGHTS):
            assert archive.read(name) == (root / artifacts[version] / name).read_bytes()
    assert answers[2].logprobs != answers[3].logprobs
    with pytest.raises(VersionNotFound) as err:
        engine.export_zip(A, 1)  # pruned: only the last two are kept
    assert err.value.field == "version" and "no version 1" in str(err.value)
    config = json.loads((root / artifacts[3] / storage.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "smollm2"
