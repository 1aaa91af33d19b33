"""Opt-in for the serving hand-off tests: they start a real vLLM and train the real model.

Tests marked ``vllm`` run for minutes and need ``make vllm``; they are skipped unless the run
selects them with ``-m vllm`` (``make test-vllm``). The model is ``builtin:smollm2`` unless
``LORAFLEET_TEST_REAL_MODEL`` names another model id or directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests import opting_in

from lorafleet_trainer import models


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opting_in.skip_unless(
        items,
        marker="vllm",
        under=Path(__file__).parent,
        reason="starts a real vLLM: run with `make test-vllm`",
        opted_in=opting_in.selected(config, "vllm"),
    )


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real instruct model as a directory both the trainer and vLLM load."""
    spec = os.environ.get("LORAFLEET_TEST_REAL_MODEL", "builtin:smollm2")
    return Path(models.resolve(spec, None))
