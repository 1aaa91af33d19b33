"""tests/node runs only on a real node (`make test-node`); with the pod runner it has nothing to check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests import opting_in

from lorafleet_local.kube import REAL_NODE_ENV


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opting_in.skip_unless(
        items,
        marker="node",
        under=Path(__file__).parent,
        reason="needs a real node: `make test-node`",
        opted_in=os.environ.get(REAL_NODE_ENV) == "1",
    )
