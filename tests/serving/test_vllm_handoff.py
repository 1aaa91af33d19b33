"""The serving hand-off, with real parts: each version the trainer commits, vLLM serves by path.

A trainer and vLLM's CPU build serve the same real instruct model. After each distill step the
test loads the answered version's artifact (a directory in the trainer's store) into vLLM with
``/v1/load_lora_adapter``, in place, under one adapter name, and checks that vLLM's greedy answer
through that name equals PEFT's greedy answer for that version; an older kept version still loads
by its own path while newer ones exist. It prints vLLM's start time and the load and answer
latencies.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tests.serving import live_vllm
from tests.serving.conftest import SERVED
from tests.trainer.service import live
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.vllm

ADAPTER = "team-a-alice"
ROUTE = "/v1/adapters/team-a/alice"
SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
MAX_TOKENS = 24
STEPS = 3
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# Strong enough that a few steps move a 135M model's greedy answer.
TRAINING = {"learning_rate": 1e-3, "teacher_top_k": 50}


class Reference:
    """PEFT on the same base model: the greedy answer a version of the adapter should give."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model: Any = None
        text = self.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        self.prompt_ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def use(self, name: str, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            if self.model is None:
                self.model = peft.PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
            elif name not in self.model.peft_config:
                self.model.load_adapter(str(path), adapter_name=name)
        self.model.set_adapter(name)
        self.model.eval()

    def greedy(self, adapted: bool = True) -> str:
        ids = torch.tensor([self.prompt_ids])
        model = self.model if adapted else self.base
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        text: str = self.tokenizer.decode(out[0, len(self.prompt_ids) :], skip_special_tokens=True)
        return text

    def sample(self, response: str, feedback: str) -> dict[str, Any]:
        """A distill sample for ``response`` with the base model's own log-probabilities."""
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([self.prompt_ids + response_ids])
        with torch.no_grad():
            logits = self.base(input_ids=ids).logits[0, len(self.prompt_ids) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(response_ids)[:, None])
        return {
            "prompt": QUESTION,
            "response": response,
            "feedback": feedback,
            "response_logprobs": [min(0.0, float(x)) for x in logprobs[:, 0]],
            "prompt_token_ids": self.prompt_ids,
            "response_token_ids": response_ids,
            "user_prompt": QUESTION,
            "system_prompt": SYSTEM,
        }


def test_each_committed_version_is_served_by_vllm_as_the_trainer_trained_it(
    real_servers: tuple[live.LiveTrainer, live_vllm.LiveVllm], real_model_dir: Path
) -> None:
    trainer, vllm = real_servers
    c = trainer.client(timeout=900)
    ref = Reference(real_model_dir)
    base_answer = ref.greedy(adapted=False)
    served_base = vllm.chat(SERVED, MESSAGES, MAX_TOKENS)["choices"][0]["message"]["content"]
    assert served_base == base_answer, "vLLM and transformers disagree on the base model itself"

    assert c.put(ROUTE, json={"lora": LORA, "epoch": 1}).status_code == 201
    body = {"samples": [ref.sample(base_answer, "Always answer in French.")], "training": TRAINING}
    loads, answers, artifacts = [], [], {}
    for _ in range(STEPS):
        step = c.post(f"{ROUTE}/distill", json=body)
        assert step.status_code == 200, step.text
        version, artifact = step.json()["version"], step.json()["artifact"]
        artifacts[version] = trainer.storage / artifact
        t0 = time.perf_counter()
        loaded = vllm.load_adapter(ADAPTER, artifacts[version])
        loads.append(time.perf_counter() - t0)
        assert loaded.status_code == 200, loaded.text
        t0 = time.perf_counter()
        served = vllm.chat(ADAPTER, MESSAGES, MAX_TOKENS)["choices"][0]["message"]["content"]
        answers.append(time.perf_counter() - t0)
        ref.use(f"v{version}", artifacts[version])
        expected = ref.greedy()
        print(f"v{version}: vLLM {served!r} / PEFT {expected!r}")
        assert served == expected, f"version {version}: vLLM served {served!r}, PEFT says {expected!r}"
    assert expected != base_answer, f"the feedback did not move the greedy answer in {STEPS} steps"

    # An older kept version still loads by its own path while a newer one is the latest.
    older = STEPS - 1
    assert vllm.load_adapter(ADAPTER, artifacts[older]).status_code == 200
    ref.use(f"v{older}", artifacts[older])
    assert vllm.chat(ADAPTER, MESSAGES, MAX_TOKENS)["choices"][0]["message"]["content"] == ref.greedy()
    load_ms = sorted(round(x * 1000) for x in loads)
    chat_ms = sorted(round(x * 1000) for x in answers)
    print(f"load_lora_adapter ms: {load_ms} (median {statistics.median(load_ms)})")
    print(f"greedy chat ms, {MAX_TOKENS} tokens at most: {chat_ms} (median {statistics.median(chat_ms)})")
