"""Shared trainer-test fixtures: one generated builtin:tiny per session, engines and samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.trainer.engine_helpers import FAST_TRAINING


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where builtin models are generated for this test session (once, then reused)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def make_engine(model_cache_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """Build and load an engine on the CPU with its own storage root under ``tmp_path``."""
    from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine

    def build(capacity: int = 1 << 30, root: str = "store", **kw: Any) -> TrainerEngine:
        config = EngineConfig(
            storage_root=tmp_path / root,
            cache_capacity_bytes=capacity,
            device=kw.pop("device", "cpu"),
            model_cache_dir=model_cache_dir,
            default_training=kw.pop("default_training", FAST_TRAINING),
            **kw,
        )
        engine = TrainerEngine(config)
        engine.load()
        return engine

    return build
