"""Opt-in suites: tests under a marker that a plain `make test` skips unless the run selects them.

The chaos campaigns run for minutes; their directory's conftest skips them,
with a reason naming the make target, unless the marker expression selects exactly that marker
(or the suite's own option says so).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def selected(config: pytest.Config, marker: str) -> bool:
    """The run's ``-m`` expression is exactly ``marker``."""
    return str(config.getoption("markexpr", "") or "").strip() == marker


def skip_unless(items: list[pytest.Item], *, marker: str, under: Path, reason: str, opted_in: bool) -> None:
    """Skip the items under ``under`` that carry ``marker``, unless the run ``opted_in``."""
    if opted_in:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker(marker) is not None and under in Path(item.path).parents:
            item.add_marker(skip)
