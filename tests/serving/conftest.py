"""The serving tests start a real vLLM and train the real model.

They are marked ``vllm`` (``make test-vllm`` runs only them; ``make test`` runs them with the rest)
and need vLLM's virtualenv (``make vllm``). The hand-off test's model is ``builtin:smollm2`` unless
``LORAFLEET_TEST_REAL_MODEL`` names another model id or directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafleet_trainer.models import models


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real instruct model as a directory both the trainer and vLLM load."""
    spec = os.environ.get("LORAFLEET_TEST_REAL_MODEL", "builtin:smollm2")
    return Path(models.resolve(spec, None))
