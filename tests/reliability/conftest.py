"""Fixtures and the opt-in for the reliability suite (faults, load and hostile input).

Tests marked ``chaos`` inject many faults and run for minutes; they are skipped unless the run
opts in with ``--run-chaos`` (``make test-chaos``) or selects them by name with ``-m chaos``, so
the plain ``make test`` keeps only the fast, scaled-down versions.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    # Only seen when tests/reliability is named on the command line (pytest reads a sub-directory's
    # conftest options only then); the marker expression below is the fallback opt-in.
    parser.addoption("--run-chaos", action="store_true", default=False, help="run the long chaos suite")


def _chaos_opted_in(config: pytest.Config) -> bool:
    try:
        if config.getoption("--run-chaos"):
            return True
    except ValueError:  # the option was not registered in this invocation
        pass
    return str(config.getoption("markexpr", "") or "").strip() == "chaos"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _chaos_opted_in(config):
        return
    skip = pytest.mark.skip(reason="long chaos suite: run with `make test-chaos`")
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("chaos") is not None and here in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated builtin:tiny for the session, shared by every trainer and replay engine."""
    return tmp_path_factory.mktemp("models")
