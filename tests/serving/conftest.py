"""The serving tests start a real vLLM and train the real model.

They are marked ``vllm`` (``make test-vllm`` runs only them; ``make test`` runs them with the rest)
and need vLLM's virtualenv (``make vllm``). The hand-off test's model is ``builtin:smollm2`` unless
``LORAFLEET_TEST_REAL_MODEL`` names another model id or directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.serving import live_vllm
from tests.trainer.service import live

from lorafleet_trainer.models import models

SERVED = "base"  # the name vLLM serves the base model under (--served-base-model-name)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real instruct model as a directory both the trainer and vLLM load."""
    spec = os.environ.get("LORAFLEET_TEST_REAL_MODEL", "builtin:smollm2")
    return Path(models.resolve(spec, None))


@pytest.fixture(scope="session")
def real_servers(
    real_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[live.LiveTrainer, live_vllm.LiveVllm]]:
    """One vLLM and one trainer on the real model, shared by the serving suites outside the cluster
    (the hand-off test and the gateway's chat test; each uses adapters of its own). vLLM takes
    minutes to start: the trainer starts meanwhile."""
    workdir = tmp_path_factory.mktemp("real-servers")
    vllm = live_vllm.launch_vllm(workdir / "vllm", real_model_dir, SERVED)
    trainer = None
    try:
        trainer = live.start_trainer(
            workdir / "trainer",
            base_model=str(real_model_dir),
            args=["--served-base-model-name", SERVED, "--keep-versions", "2"],
            ready_timeout=900,
        )
        live_vllm.wait_healthy(vllm)
        print(f"\nvLLM healthy {vllm.ready_seconds:.1f} s after launch")
        yield trainer, vllm
    finally:
        vllm.stop()
        if trainer is not None:
            trainer.stop()
