"""Fixtures for the service tests: real `lorafleet-trainer serve` processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.trainer.service import live

TOKEN = "test-token-5f1c"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated builtin:tiny for the whole session (every server loads it from here)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[live.LiveTrainer]:
    """A trainer with auth on and a small body limit, shared by one test module."""
    server = live.start_trainer(
        tmp_path_factory.mktemp("trainer"),
        token=TOKEN,
        model_cache_dir=model_cache,
        args=["--max-body-bytes", "256Ki"],
    )
    yield server
    server.stop()
