"""Suite-wide collection order: the end-to-end tests run last.

They start a control plane, trainers and an operator, so a failure in a fast unit test shows up
minutes earlier, and `-x` stops before the expensive part.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A stable sort keeps each group's own order.
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)
