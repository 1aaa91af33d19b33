"""Adapter storage: PEFT layout, immutable kept versions, crash safety, ENOSPC, byte counts."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from lorafleet_trainer.engine import storage
from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.engine.storage import AdapterMeta, AdapterStore, VersionNotFound
from lorafleet_trainer.errors import AdapterNotFound, InvalidInput, StorageFull
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.settings import TrainerSettings

A = AdapterId("team-a", "alice")
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
CONFIG = {"peft_type": "LORA", "r": 2}


def _meta(version: int, epoch: int = 1) -> AdapterMeta:
    return AdapterMeta(A, version, epoch, LoraSpec(rank=2), TrainingSpec(), "builtin:tiny")


def _tensors(fill: float, step: int) -> StateBundle:
    w = {KEY: torch.full((2, 4), fill)}
    return StateBundle.from_tensors(
        w, {KEY: torch.full((2, 4), fill / 2)}, {KEY: torch.full((2, 4), fill / 4)}, step
    )


def test_write_read_round_trip_and_layout(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(0), _tensors(1.0, 0), CONFIG)
    store.write(_meta(1), _tensors(2.0, 1), CONFIG)
    d = store.path(A)
    assert d.is_symlink()
    assert sorted(os.listdir(d)) == sorted(
        [storage.ADAPTER_CONFIG, storage.ADAPTER_WEIGHTS, storage.OPTIMIZER_STATE, storage.META]
    )
    # Each version: its directory and the link naming it; "alice" names the latest.
    names = sorted(p.name for p in (tmp_path / "team-a").iterdir())
    assert names[-1] == "alice" and [n for n in names if n.startswith(".alice.v")] == names[:-1]
    assert len(names) == 5 and store.versions(A) == [0, 1]
    assert store.read_meta(A) == _meta(1)
    t = store.read_tensors(A)
    assert t.step == 1 and torch.equal(t.weights[KEY], torch.full((2, 4), 2.0))
    assert torch.equal(t.exp_avg_sq[KEY], torch.full((2, 4), 0.5))
    assert torch.equal(t.ema[KEY], torch.full((2, 4), 2.0))  # from_tensors without an EMA: the weights
    assert json.loads((d / storage.META).read_text())["version"] == 1
    assert list(store.iter_adapters()) == [A]


def test_bytes_are_counted(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(0), _tensors(1.0, 0), CONFIG)
    d = store.path(A)
    files = [storage.ADAPTER_WEIGHTS, storage.OPTIMIZER_STATE, storage.ADAPTER_CONFIG, storage.META]
    assert store.written_bytes == sum((d / f).stat().st_size for f in files)
    store.read_tensors(A)
    assert (
        store.read_bytes
        == (d / storage.ADAPTER_WEIGHTS).stat().st_size + (d / storage.OPTIMIZER_STATE).stat().st_size
    )


def test_crash_between_write_aside_and_rename_keeps_old_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(3), _tensors(3.0, 3), CONFIG)
    aside = store._write_aside(_meta(4), _tensors(4.0, 4), CONFIG)  # the process dies here
    assert aside.is_dir()
    reopened = AdapterStore(tmp_path)  # a restarted trainer
    assert reopened.read_meta(A).version == 3
    assert torch.equal(reopened.read_tensors(A).weights[KEY], torch.full((2, 4), 3.0))
    assert reopened.sweep(A) == 1 and not aside.exists()
    assert reopened.read_meta(A).version == 3


def test_no_space_raises_storage_full_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(1), _tensors(1.0, 1), CONFIG)
    calls = {"n": 0}
    real = store._write_bytes

    def second_write_fails(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store, "_write_bytes", second_write_fails)
    with pytest.raises(StorageFull):
        store.write(_meta(2), _tensors(2.0, 2), CONFIG)
    assert store.read_meta(A).version == 1
    assert torch.equal(store.read_tensors(A).weights[KEY], torch.full((2, 4), 1.0))
    assert sorted(p.name for p in (tmp_path / "team-a").iterdir() if p.name.startswith(".")) == [
        ".alice.v00000001",
        store.path(A).resolve().name,
    ]


def test_metadata_only_update_links_tensors(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(2, epoch=1), _tensors(2.0, 2), CONFIG)
    before = (store.path(A) / storage.ADAPTER_WEIGHTS).stat().st_ino
    written = store.written_bytes
    store.write(_meta(2, epoch=5), None)
    assert store.read_meta(A).epoch == 5
    assert (store.path(A) / storage.ADAPTER_WEIGHTS).stat().st_ino == before
    assert store.written_bytes - written == (store.path(A) / storage.META).stat().st_size


def test_delete_and_missing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(AdapterNotFound):
        store.read_meta(A)
    assert store.delete(A) is False
    store.write(_meta(0), _tensors(0.0, 0), CONFIG)
    assert store.delete(A) is True
    assert not store.exists(A) and list((tmp_path / "team-a").iterdir()) == []
    with pytest.raises(AdapterNotFound):
        store.read_tensors(A)


@pytest.mark.parametrize("bad", ["..", ".hidden", "a/b", "A", "x" * 64, ""])
def test_ids_cannot_escape_the_root(bad: str) -> None:
    with pytest.raises(InvalidInput):
        AdapterId("team-a", bad)
    with pytest.raises(InvalidInput):
        AdapterId(bad, "alice")


def test_step_writes_link_the_unchanging_config(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(0), _tensors(0.0, 0), CONFIG)
    inode = (store.path(A) / storage.ADAPTER_CONFIG).stat().st_ino
    store.write(_meta(1), _tensors(1.0, 1))
    assert (store.path(A) / storage.ADAPTER_CONFIG).stat().st_ino == inode
    assert json.loads((store.path(A) / storage.ADAPTER_CONFIG).read_text()) == CONFIG
    assert store.read_meta(A).version == 1


def _dirs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "team-a").iterdir() if p.is_dir() and not p.is_symlink())


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_the_last_k_versions_stay_whole_and_loadable_by_path(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=2)
    store.write(_meta(0), _tensors(0.0, 0), CONFIG)
    store.write(_meta(1), _tensors(1.0, 1))
    v1 = tmp_path / store.artifact(A, 1)
    before = _snapshot(v1)
    store.write(_meta(2), _tensors(2.0, 2))
    # Version 1 is still there, byte for byte and inode for inode, while version 2 is the latest.
    assert store.versions(A) == [1, 2] and _snapshot(v1) == before
    # The artifact is the version's own directory, the one its version link names.
    assert re.fullmatch(r"team-a/\.alice\.v00000001-[0-9a-f]{12}", store.artifact(A, 1))
    assert (tmp_path / "team-a/.alice.v00000001").resolve() == v1.resolve()
    assert json.loads((v1 / storage.META).read_text())["version"] == 1
    store.write(_meta(3), _tensors(3.0, 3))
    assert store.versions(A) == [2, 3] and not v1.exists()
    # Only the kept versions' directories remain; the latest link names the newest.
    assert _dirs(tmp_path) == sorted(os.readlink(store.version_path(A, v)) for v in (2, 3))
    assert store.path(A).resolve() == store.version_path(A, 3).resolve()


def test_a_version_being_loaded_by_a_server_outlives_keep_versions_until_released(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=1)
    held: set[int] = set()
    store.pinned = lambda adapter: held if adapter == A else set()
    store.write(_meta(0), _tensors(0.0, 0), CONFIG)
    held.add(0)  # a server is loading version 0
    store.write(_meta(1), _tensors(1.0, 1))
    store.write(_meta(2), _tensors(2.0, 2))
    assert store.versions(A) == [0, 2]
    assert json.loads((tmp_path / store.artifact(A, 0) / storage.META).read_text())["version"] == 0
    held.clear()
    store.write(_meta(3), _tensors(3.0, 3))
    assert store.versions(A) == [3]


def test_read_files_of_a_kept_version_and_404s_naming_the_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=2)
    for v in range(3):
        store.write(_meta(v), _tensors(float(v), v), CONFIG)
    files = store.read_files(A, (storage.ADAPTER_WEIGHTS,), version=1)
    assert torch.equal(storage.st_load(files[storage.ADAPTER_WEIGHTS])[KEY], torch.full((2, 4), 1.0))
    latest = store.read_files(A, (storage.ADAPTER_WEIGHTS,))
    assert latest == store.read_files(A, (storage.ADAPTER_WEIGHTS,), version=2)
    for gone in (0, 7):  # pruned, never made
        with pytest.raises(VersionNotFound) as err:
            store.read_files(A, (storage.ADAPTER_WEIGHTS,), version=gone)
        assert err.value.field == "version" and f"no version {gone}" in str(err.value)
        assert "[1, 2]" in str(err.value)
    with pytest.raises(AdapterNotFound) as missing:
        store.read_files(AdapterId("team-a", "bob"), (storage.ADAPTER_WEIGHTS,), version=1)
    assert not isinstance(missing.value, VersionNotFound)


def test_a_new_epoch_keeps_the_versions_weights_in_a_directory_of_its_own(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write(_meta(1), _tensors(1.0, 1), CONFIG)
    store.write(_meta(2), _tensors(2.0, 2))
    old = tmp_path / store.artifact(A, 2)
    weights = (old / storage.ADAPTER_WEIGHTS).read_bytes()
    store.write(_meta(2, epoch=5), None)
    # The same version and weights, the new epoch's metadata, in a directory no server has loaded
    # before (a server keys its caches by path); the superseded directory is gone.
    new = tmp_path / store.artifact(A, 2)
    assert new != old and (new / storage.ADAPTER_WEIGHTS).read_bytes() == weights
    assert json.loads((new / storage.META).read_text())["epoch"] == 5
    assert not old.exists() and store.versions(A) == [1, 2]
    assert store.path(A).resolve() == new.resolve()


def test_crash_between_the_version_link_and_the_latest_link(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=1)
    store.write(_meta(1), _tensors(1.0, 1), CONFIG)
    aside = store._write_aside(_meta(2), _tensors(2.0, 2), None)
    storage._swap_link(A, store.version_path(A, 2), aside.name)  # the process dies here
    reopened = AdapterStore(tmp_path, keep_versions=1)
    assert reopened.read_meta(A).version == 1
    # Nothing was pruned for the uncommitted version; the sweep drops it, not version 1.
    assert reopened.sweep(A) == 2 and reopened.versions(A) == [1] and not aside.exists()
    reopened.write(_meta(2), _tensors(2.0, 2))
    assert reopened.read_meta(A).version == 2 and reopened.versions(A) == [2]


def test_a_failed_commit_prunes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path, keep_versions=1)
    store.write(_meta(1), _tensors(1.0, 1), CONFIG)
    real = storage._swap_link
    calls = {"n": 0}

    def latest_swap_fails(adapter: AdapterId, link: Path, target: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "I/O error")
        real(adapter, link, target)

    monkeypatch.setattr(storage, "_swap_link", latest_swap_fails)
    with pytest.raises(OSError):
        store.write(_meta(2), _tensors(2.0, 2))
    assert store.read_meta(A).version == 1 and store.versions(A) == [1]
    assert (tmp_path / store.artifact(A, 1) / storage.ADAPTER_WEIGHTS).is_file()
    assert _dirs(tmp_path) == [store.path(A).resolve().name]


def test_keep_versions_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1, True):
        with pytest.raises(InvalidInput) as err:
            AdapterStore(tmp_path, keep_versions=bad)
        assert err.value.field == "keep_versions"
    assert TrainerSettings().keep_versions == storage.DEFAULT_KEEP_VERSIONS


def test_the_ema_is_stored_and_an_adapter_stored_without_one_reads_back(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    bundle = _tensors(1.0, 3)
    bundle.ema[KEY].fill_(0.25)
    store.write(_meta(0), bundle, CONFIG)
    assert torch.equal(store.read_tensors(A).ema[KEY], torch.full((2, 4), 0.25))
    # An optimizer file written before the EMA was kept: the EMA starts at the weights.
    path = store.path(A).resolve() / storage.OPTIMIZER_STATE
    old = {k: v for k, v in load_file(str(path)).items() if not k.startswith("ema.")}
    path.write_bytes(save(old))
    again = store.read_tensors(A)
    assert torch.equal(again.ema[KEY], again.weights[KEY]) and again.step == 3
