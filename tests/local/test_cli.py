"""`lorafleet-local up | down | demo`, run as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet_local import checkout, cli, control_plane, kubeconfigs


def lorafleet_local(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet_local", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("steps", ["0", "51"])
def test_demo_refuses_a_step_count_out_of_range(steps: str) -> None:
    done = lorafleet_local("demo", "--steps", steps)
    assert done.returncode == 2
    assert f"--steps must be between 1 and 50, not {steps}" in done.stderr


def test_down_without_a_cluster_says_so_and_succeeds(tmp_path: Path) -> None:
    done = lorafleet_local("down", "--dir", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr
    assert "no local cluster runs in" in done.stdout


def test_a_stale_pid_file_is_not_a_running_cluster(tmp_path: Path) -> None:
    (tmp_path / cli.PID_FILE).write_text(str(os.getpid()))  # this pytest process, not a cluster
    assert cli.running_pid(tmp_path) is None


@pytest.mark.e2e
def test_up_leaves_a_cluster_running_that_down_stops(tmp_path: Path) -> None:
    missing = checkout.missing_binaries(checkout.bin_dir(), control_plane.BINARIES)
    if missing:
        pytest.fail(f"missing {', '.join(missing)} in {checkout.bin_dir()}: run `make kube-clients tools`")
    workdir = tmp_path / "cluster"
    kept = tmp_path / "kubeconfig"  # `down` removes the cluster's directory
    up = lorafleet_local("up", "--dir", str(workdir))
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.startswith("export KUBECONFIG="), up.stdout
        kubeconfig = Path(up.stdout.split("=", 1)[1].split()[0])
        assert kubeconfigs.is_local(kubeconfig)
        kept.write_bytes(kubeconfig.read_bytes())
        pid = cli.running_pid(workdir)
        assert pid is not None
        # `up` has returned; the cluster it left serves kubectl.
        assert kubectl(kept, "get", "serviceaccount", "default", "-o", "name").stdout.strip() == (
            "serviceaccount/default"
        )
        again = lorafleet_local("up", "--dir", str(workdir))
        assert again.returncode == 1
        assert f"pid {pid}" in again.stdout
    finally:
        down = lorafleet_local("down", "--dir", str(workdir))
    assert down.returncode == 0, down.stderr
    assert "stopped the local cluster" in down.stdout
    assert not workdir.exists()
    assert kubectl(kept, "get", "namespaces", "--request-timeout=5s").returncode != 0


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(checkout.bin_dir() / "kubectl"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        timeout=60,
        check=False,
    )
