"""Where the LoraFleet checkout keeps what a local cluster runs: the chart, the examples, bin/.

The local cluster installs the chart with Helm and the demo applies the example manifests, both
from the checkout this package runs from (`pip install -e .`); the control-plane binaries, kubectl
and helm are in its bin/ (built by `make setup`) unless LORAFLEET_BIN_DIR names another directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "lorafleet"
EXAMPLES = ROOT / "examples"
BIN_DIR_ENV = "LORAFLEET_BIN_DIR"


def bin_dir() -> Path:
    return Path(os.environ.get(BIN_DIR_ENV, ROOT / "bin"))


def missing_binaries(directory: Path, names: tuple[str, ...]) -> list[str]:
    return [b for b in names if not os.access(directory / b, os.X_OK)]
