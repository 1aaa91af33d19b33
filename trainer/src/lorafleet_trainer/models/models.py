"""Base models: the builtin ones, made on first use, and loading any model id.

``builtin:tiny`` (about 3.5M parameters) and ``builtin:small`` (about 100M) are Qwen2-architecture
causal LMs with seeded random weights and a byte-level tokenizer with a ChatML chat template. They
are written once into a local cache directory and then loaded through ``from_pretrained`` exactly
like a hub id or a local directory, so tests and benchmarks exercise the production load path.
Generation is deterministic (fixed seed, fixed config) and needs no network. ``builtin:smollm2``
is a real instruct model, converted once from a PyPI wheel (see :mod:`converting`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet_trainer.errors import InvalidInput
from lorafleet_trainer.models import converting, modeldirs

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2"  # the real instruct model; the others are synthetic
# Bumped whenever the generated files change, so a stale cache directory is never reused.
_BUILTIN_FORMAT = 1
_SEED = 20260128

# ChatML, the template family of the Qwen2 models this architecture imitates.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class BuiltinSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 512
    max_position_embeddings: int = 2048


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": BuiltinSpec(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_MODEL_CACHE", Path.home() / ".cache" / "lorafleet" / "models"))


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A byte-level vocabulary of the 256 byte symbols: every string tokenizes, nothing is trained.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    # Progress bars on stderr are noise in a server's log.
    hf_logging.disable_progress_bar()


def _generate(spec: BuiltinSpec, target: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    _quiet()
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=258,
        pad_token_id=256,
    )
    # fork_rng keeps the caller's global RNG untouched while the weights come from our seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modeldirs.save(target, model, _build_tokenizer())


def resolve(model_id: str, cache_dir: Path | None = None) -> str:
    """The ``from_pretrained`` argument for ``model_id``, generating a builtin model if needed."""
    if not model_id.startswith(BUILTIN_PREFIX):
        return model_id
    name = model_id[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS and name != SMOLLM2:
        raise InvalidInput(
            f"unknown builtin model {model_id!r}; known: {sorted([*BUILTINS, SMOLLM2])}", field="base_model"
        )
    root = cache_dir or default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    if name == SMOLLM2:
        return str(converting.materialise(root))
    target = root / f"builtin-{name}-v{_BUILTIN_FORMAT}"
    if not (target / "config.json").exists():
        _generate(BUILTINS[name], target)
    return str(target)


def load(model_id: str, cache_dir: Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` through ``from_pretrained`` for any kind of id, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    path = resolve(model_id, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
