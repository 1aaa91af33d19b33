"""Durable adapter storage: one PEFT adapter directory per adapter, replaced atomically per version.

``<root>/<ns>/<name>`` is a symlink to a hidden version directory ``.<name>.v<version>-<id>`` that
holds ``adapter_config.json`` + ``adapter_model.safetensors`` (a PEFT adapter, loadable as is),
``optimizer.safetensors`` (AdamW moments and step; never pickle) and ``lorafleet.json`` (version,
epoch, LoRA config, training defaults). A new version is written aside in full, every file and the
directory fsynced, then the symlink is swapped by ``rename`` and the parent fsynced. A crash at any
point leaves the previous symlink, and so the previous version, whole; orphans are swept later.
DNS-1123 names never start with '.', so the hidden entries cannot collide with an adapter.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet_trainer.bundles import StateBundle
from lorafleet_trainer.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.errors import AdapterNotFound, StorageFull
from lorafleet_trainer.ids import AdapterId

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
META = "lorafleet.json"
FORMAT = 1
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class AdapterMeta:
    """What ``lorafleet.json`` records about one stored adapter."""

    adapter: AdapterId
    version: int
    epoch: int
    lora: LoraSpec
    training: TrainingSpec
    base_model: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "namespace": self.adapter.namespace,
            "name": self.adapter.name,
            "version": self.version,
            "epoch": self.epoch,
            "lora": self.lora.to_dict(),
            "training": self.training.to_dict(),
            "base_model": self.base_model,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AdapterMeta:
        return cls(
            adapter=AdapterId(d["namespace"], d["name"]),
            version=int(d["version"]),
            epoch=int(d["epoch"]),
            lora=LoraSpec.from_dict(d["lora"]),
            training=TrainingSpec.from_dict(d["training"]),
            base_model=str(d["base_model"]),
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Reads and atomically writes adapters under ``root``; counts every byte it moves."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counter_lock = threading.Lock()
        self.read_bytes = 0
        self.written_bytes = 0

    # ---- paths -------------------------------------------------------------------------
    def path(self, adapter: AdapterId) -> Path:
        """The adapter's directory as users see it (the symlink to its current version)."""
        return self.root / adapter.namespace / adapter.name

    def exists(self, adapter: AdapterId) -> bool:
        return (self.path(adapter) / META).is_file()

    def iter_adapters(self) -> Iterator[AdapterId]:
        for ns in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for entry in sorted(ns.iterdir()):
                if not entry.name.startswith(".") and (entry / META).is_file():
                    yield AdapterId(ns.name, entry.name)

    # ---- reading -----------------------------------------------------------------------
    def _read(self, path: Path) -> bytes:
        data = path.read_bytes()
        with self._counter_lock:
            self.read_bytes += len(data)
        return data

    def read_meta(self, adapter: AdapterId) -> AdapterMeta:
        try:
            raw = self._read(self.path(adapter) / META)
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {adapter} does not exist", field="adapter") from None
        return AdapterMeta.from_json(json.loads(raw))

    def read_tensors(self, adapter: AdapterId) -> StateBundle:
        # Resolve the symlink once so both files come from the same version even if a writer
        # swaps it between the two reads.
        current = self.path(adapter).resolve()
        try:
            weights = st_load(self._read(current / ADAPTER_WEIGHTS))
            opt = st_load(self._read(current / OPTIMIZER_STATE))
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {adapter} does not exist", field="adapter") from None
        exp_avg = {k[len("exp_avg.") :]: t for k, t in opt.items() if k.startswith("exp_avg.")}
        exp_avg_sq = {k[len("exp_avg_sq.") :]: t for k, t in opt.items() if k.startswith("exp_avg_sq.")}
        return StateBundle.from_tensors(weights, exp_avg, exp_avg_sq, step=int(opt["step"].item()))

    def read_files(self, adapter: AdapterId, names: tuple[str, ...]) -> dict[str, bytes]:
        """Several files of one version (the symlink is resolved once)."""
        current = self.path(adapter).resolve()
        try:
            return {name: self._read(current / name) for name in names}
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {adapter} does not exist", field="adapter") from None

    # ---- writing -----------------------------------------------------------------------
    def _write_bytes(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._counter_lock:
            self.written_bytes += len(data)

    def write(
        self,
        meta: AdapterMeta,
        tensors: StateBundle | None,
        adapter_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Make ``meta`` (+ ``tensors``) the adapter's current version, atomically.

        With ``tensors=None`` only the metadata changes (e.g. a new epoch): the tensor files of the
        current version are hard-linked into the new version directory, costing no copy. With
        ``adapter_config=None`` the current version's (immutable after creation) config is linked.
        """
        aside = self._write_aside(meta, tensors, adapter_config)
        self._commit(meta.adapter, aside)

    def _write_aside(
        self, meta: AdapterMeta, tensors: StateBundle | None, adapter_config: Mapping[str, Any] | None
    ) -> Path:
        adapter = meta.adapter
        ns_dir = self.root / adapter.namespace
        ns_dir.mkdir(parents=True, exist_ok=True)
        aside = ns_dir / f".{adapter.name}.v{meta.version:08d}-{uuid.uuid4().hex[:12]}"
        aside.mkdir()
        try:
            if tensors is None:
                current = self.path(adapter).resolve()
                for name in (ADAPTER_WEIGHTS, OPTIMIZER_STATE, ADAPTER_CONFIG):
                    # Version directories are never modified after commit, so sharing inodes is safe.
                    os.link(current / name, aside / name)
            else:
                if adapter_config is None:
                    os.link(self.path(adapter).resolve() / ADAPTER_CONFIG, aside / ADAPTER_CONFIG)
                else:
                    self._write_bytes(
                        aside / ADAPTER_CONFIG, json.dumps(adapter_config, indent=2, sort_keys=True).encode()
                    )
                self._write_bytes(
                    aside / ADAPTER_WEIGHTS,
                    st_save(
                        {k: t.contiguous() for k, t in tensors.weights.items()}, metadata={"format": "pt"}
                    ),
                )
                opt = {f"exp_avg.{k}": t.contiguous() for k, t in tensors.exp_avg.items()}
                opt.update({f"exp_avg_sq.{k}": t.contiguous() for k, t in tensors.exp_avg_sq.items()})
                opt["step"] = torch.tensor([tensors.step], dtype=torch.int64)
                self._write_bytes(aside / OPTIMIZER_STATE, st_save(opt))
            self._write_bytes(aside / META, json.dumps(meta.to_json(), indent=2, sort_keys=True).encode())
            _fsync_dir(aside)
        except BaseException as exc:
            shutil.rmtree(aside, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                raise StorageFull(f"no space left to persist adapter {adapter}: {exc}") from exc
            raise
        return aside

    def _commit(self, adapter: AdapterId, aside: Path) -> None:
        link = self.path(adapter)
        previous = link.resolve() if link.is_symlink() else None
        tmp_link = link.parent / f".{adapter.name}.link-{uuid.uuid4().hex[:12]}"
        os.symlink(aside.name, tmp_link)
        try:
            os.rename(tmp_link, link)  # atomic replace of the old symlink
        except BaseException:
            tmp_link.unlink(missing_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        _fsync_dir(link.parent)
        if previous is not None and previous != aside:
            shutil.rmtree(previous, ignore_errors=True)
        self.sweep(adapter)

    def sweep(self, adapter: AdapterId) -> int:
        """Remove version directories and links of ``adapter`` that a crash left behind."""
        link = self.path(adapter)
        current = link.resolve().name if link.is_symlink() else None
        removed = 0
        prefix = f".{adapter.name}."
        for entry in link.parent.glob(f"{prefix}*"):
            suffix = entry.name[len(prefix) :]
            if entry.name == current or not (suffix.startswith("v") or suffix.startswith("link-")):
                continue
            if entry.is_symlink() or entry.is_file():
                entry.unlink(missing_ok=True)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed

    def delete(self, adapter: AdapterId) -> bool:
        """Remove the adapter; True if it existed. The symlink goes first, so readers see it gone."""
        link = self.path(adapter)
        if not link.is_symlink():
            return False
        link.unlink()
        _fsync_dir(link.parent)
        self.sweep(adapter)
        return True
