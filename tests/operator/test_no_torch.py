"""The operator never imports torch: its image installs only the `operator` extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator/src/lorafleet_operator"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
HEAVY = ("torch", "transformers", "peft", "lorafleet_trainer")


def test_importing_every_operator_module_leaves_torch_out() -> None:
    assert "handlers" in MODULES and "cli" in MODULES
    imports = "; ".join(f"import lorafleet_operator.{m}" for m in MODULES)
    code = f"import sys; {imports}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_operator_image_installs_only_the_operator_extra() -> None:
    dockerfile = (ROOT / "operator/Dockerfile").read_text(encoding="utf-8")
    assert ".[operator]" in dockerfile
    for heavy in ("trainer]", "torch", ",dev"):
        assert heavy not in dockerfile, heavy


@pytest.mark.parametrize("module", MODULES)
def test_every_module_opens_with_a_docstring(module: str) -> None:
    text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    assert text.lstrip().startswith('"""'), module
