"""Adapter storage: PEFT layout, atomic versions, crash safety, ENOSPC, byte counts."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from lorafleet_trainer import storage
from lorafleet_trainer.bundles import StateBundle
from lorafleet_trainer.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.errors import AdapterNotFound, InvalidInput, StorageFull
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.storage import AdapterMeta, AdapterStore

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
    # Only the current version directory is left behind.
    assert sorted(p.name for p in (tmp_path / "team-a").iterdir())[1:] == ["alice"]
    assert store.read_meta(A) == _meta(1)
    t = store.read_tensors(A)
    assert t.step == 1 and torch.equal(t.weights[KEY], torch.full((2, 4), 2.0))
    assert torch.equal(t.exp_avg_sq[KEY], torch.full((2, 4), 0.5))
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
    assert [p.name for p in (tmp_path / "team-a").iterdir() if p.name.startswith(".")] == [
        store.path(A).resolve().name
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
