"""Fixtures and the opt-in for the reliability suite (faults, load and hostile input).

Tests marked ``chaos`` inject many faults and run for minutes; they are skipped unless the run
opts in with ``--run-chaos`` (``make test-chaos``) or selects them by name with ``-m chaos``, so
the plain ``make test`` keeps only the fast, scaled-down versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import opting_in
from tests.reliability.fleetstate import CLAIM, FAULTS_NAMESPACE, POOL, POOL_MANIFEST, Faulty

from lorafleet_local.fleet import Fleet
from lorafleet_local.kube import Kube


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
    return opting_in.selected(config, "chaos")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opting_in.skip_unless(
        items,
        marker="chaos",
        under=Path(__file__).parent,
        reason="long chaos suite: run with `make test-chaos`",
        opted_in=_chaos_opted_in(config),
    )


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated builtin:tiny for the session, shared by every trainer and replay engine."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def faulty(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    """One release of the chart with the durable pool, shared by the control-plane fault tests
    and the hostile manifests; the operator kills they made are printed at the end."""
    fleet = Fleet.install(kube, FAULTS_NAMESPACE, tmp_path_factory.mktemp("faults"))
    state = Faulty(fleet)
    try:
        kube.apply(POOL_MANIFEST, namespace=FAULTS_NAMESPACE)
        kube.kubectl(
            "wait", f"trainerpool/{POOL}", "-n", FAULTS_NAMESPACE,
            "--for=jsonpath={.status.readyReplicas}=2", "--timeout=600s", timeout=620,
        )  # fmt: skip
        yield state
    finally:
        for kill in state.kills:
            print(f"operator kill: {kill}")
        fleet.uninstall()
        kube.kubectl(
            "delete", "pvc", CLAIM, "-n", FAULTS_NAMESPACE, "--ignore-not-found", "--wait=false", check=False
        )
