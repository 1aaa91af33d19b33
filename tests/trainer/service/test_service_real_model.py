"""Learning on the real model (builtin:smollm2), end to end over the trainer's HTTP API.

One adapter is taught "Always answer in French" the way a client would: greedy rollouts of its own
(``generate``), the feedback added to each, then repeated distill steps on that batch. The run
happens once per module; each test asserts one thing it must show. The model is converted into the
user's model cache on first use (about a minute) and reused by later runs.

How "moves towards the feedback" is measured, on a held-out question the adapter never trained on:
the mean per-token log-likelihood of a French reference answer must rise, relative to the rise of
an English reference answer of the same content. A greedy answer is a step function of the weights
(it may flip on any step, or not within a short run); a reference answer's likelihood is
continuous and says directly how much more the model expects to answer in French. Subtracting the
English gain removes whatever the adapter did to every answer alike (style, length). Everything is
greedy or fixed, so the run is deterministic. The greedy answers and the share of French function
words in them are printed for the reader.
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from tests.trainer.service import live
from transformers import AutoTokenizer

from lorafleet_trainer.models import models

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

ADAPTER = "/v1/adapters/learn/french"
LORA = {
    "rank": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
TRAINING = {"learning_rate": 1e-4, "alpha": 0.5, "teacher_top_k": 100}
FEEDBACK = "Always answer in French."
QUESTIONS = [
    "What is the capital of Italy?",
    "Name a fruit that is red.",
    "How many days are in a week?",
    "What colour is the sky on a clear day?",
]
HELD_OUT = "What is the largest ocean on Earth?"
FRENCH_REFERENCE = "Le plus grand océan de la Terre est l'océan Pacifique."
ENGLISH_REFERENCE = "The largest ocean on Earth is the Pacific Ocean."
STEPS = 10
FRENCH_WORDS = frozenset(
    [
        "le",
        "la",
        "les",
        "un",
        "une",
        "des",
        "du",
        "de",
        "et",
        "est",
        "sont",
        "en",
        "dans",
        "pour",
        "avec",
        "sur",
        "pas",
        "que",
        "qui",
        "il",
        "elle",
        "nous",
        "vous",
        "je",
        "ce",
        "cette",
        "au",
        "aux",
        "plus",
        "très",
    ]
)


def french_share(text: str) -> float:
    """The share of words in ``text`` that are common French function words."""
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    return sum(w in FRENCH_WORDS for w in words) / max(1, len(words))


@dataclass
class Run:
    server: live.LiveTrainer
    first_step: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    export: bytes = b""


def _generate(c: Any, path: str, question: str) -> dict[str, Any]:
    r = c.post(path, json={"messages": [{"role": "user", "content": question}], "max_tokens": 24})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    server = live.start_trainer(tmp_path_factory.mktemp("real"), base_model="builtin:smollm2")
    c = server.client(timeout=900)
    result = Run(server)
    try:
        assert c.put(ADAPTER, json={"lora": LORA, "epoch": 1, "training": TRAINING}).status_code == 201
        rollouts = [_generate(c, f"{ADAPTER}/generate", q) for q in QUESTIONS]
        assert all(r["version"] == 0 for r in rollouts)
        samples = [{**r["sample"], "feedback": FEEDBACK} for r in rollouts]
        result.before = _generate(c, f"{ADAPTER}/generate", HELD_OUT)
        for _ in range(STEPS):
            r = c.post(f"{ADAPTER}/distill", json={"samples": samples})
            assert r.status_code == 200, r.text
            if not result.first_step:
                result.first_step = r.json()
            result.losses.append(r.json()["metrics"]["distill_loss"])
        result.after = _generate(c, f"{ADAPTER}/generate", HELD_OUT)
        result.export = c.get(f"{ADAPTER}/export").content
        print(f"\ndistill loss over {STEPS} steps: " + " ".join(f"{x:.4f}" for x in result.losses))
        for label, answer in (("before", result.before), ("after", result.after)):
            share = french_share(answer["text"])
            print(f"{label} (v{answer['version']}, French words {share:.2f}): {answer['text']!r}")
        yield result
    finally:
        server.stop()


@pytest.fixture(scope="module")
def peft_model(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The exported adapter, loaded by PEFT onto the same converted base model."""
    out = tmp_path_factory.mktemp("export")
    zipfile.ZipFile(io.BytesIO(run.export)).extractall(out)
    base, _ = models.load("builtin:smollm2")
    with warnings.catch_warnings():
        # PEFT 0.21 probes a transformers attribute that transformers 5.24 marks deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.PeftModel.from_pretrained(base, str(out))
    model.eval()
    return model


def _token_logprobs(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward (no KV cache) at each response token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]


def test_a_first_step_on_its_own_rollouts_has_importance_ratio_one(run: Run) -> None:
    assert run.first_step["version"] == 1
    assert run.first_step["metrics"]["mean_is_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert run.first_step["metrics"]["clip_fraction"] == 0.0


def test_repeated_steps_lower_the_distillation_loss(run: Run) -> None:
    assert len(run.losses) == STEPS
    assert run.losses[-1] < 0.5 * run.losses[0], run.losses
    assert min(run.losses[-3:]) < min(run.losses[:3]), run.losses


def test_exported_adapter_in_peft_gives_the_trainers_logprobs(run: Run, peft_model: Any) -> None:
    answer = run.after
    assert answer["version"] == STEPS
    ours = torch.tensor(answer["logprobs"])
    theirs = _token_logprobs(peft_model, answer["prompt_token_ids"], answer["token_ids"])
    # The trainer decoded with a KV cache; PEFT runs one plain forward over prompt and answer.
    assert float((ours - theirs).abs().max()) < 1e-4
    with torch.no_grad():
        ids = torch.tensor([answer["prompt_token_ids"] + answer["token_ids"]])
        logits = peft_model(input_ids=ids).logits[0, len(answer["prompt_token_ids"]) - 1 : -1]
    assert torch.argmax(logits, dim=-1).tolist() == answer["token_ids"]  # the same greedy answer


def test_the_held_out_answer_moves_towards_french(run: Run, peft_model: Any) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models.resolve("builtin:smollm2"))
    prompt = run.after["prompt_token_ids"]
    gains = {}
    for label, reference in (("french", FRENCH_REFERENCE), ("english", ENGLISH_REFERENCE)):
        ids = [int(i) for i in tokenizer(reference, add_special_tokens=False)["input_ids"]]
        after = float(_token_logprobs(peft_model, prompt, ids).mean())
        with peft_model.disable_adapter():
            before = float(_token_logprobs(peft_model, prompt, ids).mean())
        gains[label] = after - before
        print(f"{label} reference: mean logprob {before:.3f} -> {after:.3f}")
    assert gains["french"] > 0.0, gains
    assert gains["french"] > gains["english"], gains
