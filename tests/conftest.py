"""Suite-wide fixtures and collection order.

The end-to-end tests run last: they start a control plane, trainers and an operator, so a failure
in a fast unit test shows up minutes earlier, and `-x` stops before the expensive part. `kube` is
the one cluster they share, the e2e scenario and the control-plane faults of tests/reliability
alike: the KUBECONFIG cluster when that variable is set (the kind workflow), else a local control
plane with the pod runner, torn down at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lorafleet_local import checkout, control_plane
from lorafleet_local.kube import REAL_NODE_ENV, Kube


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A stable sort keeps each group's own order.
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    # An external cluster (KUBECONFIG) needs only the clients; the local one needs the whole set.
    names = ("kubectl", "helm") if os.environ.get("KUBECONFIG") else control_plane.BINARIES
    missing = checkout.missing_binaries(checkout.bin_dir(), names)
    if missing:
        pytest.fail(f"missing {', '.join(missing)} in {checkout.bin_dir()}: run `make kube-clients tools`")
    # Step holds let the fault tests park a trainer's step at a known phase (lorafleet_trainer.engine.holds).
    # LORAFLEET_REAL_NODE=1 (`make test-node`): a kubelet runs the pods from the images, not the runner.
    real_node = os.environ.get(REAL_NODE_ENV) == "1"
    handle = Kube.start(tmp_path_factory.mktemp("e2e"), step_holds=True, real_node=real_node)
    if handle.node is not None:
        print(f"\nreal node: {handle.node.figures}")
    try:
        yield handle
    finally:
        handle.stop()
