"""Durable adapter storage: every committed version in its own directory, never rewritten.

In ``<root>/<ns>/``, for an adapter ``name``:

- ``.<name>.v<version>-<id>/`` a version directory: ``adapter_config.json`` +
  ``adapter_model.safetensors`` (a PEFT adapter, loadable as is by PEFT and vLLM),
  ``optimizer.safetensors`` (AdamW moments and step; never pickle) and ``lorafleet.json`` (version,
  epoch, LoRA config, training defaults, the answers of the latest keyed steps). Nothing in it
  changes after it is committed.
- ``.<name>.v<version>`` a link to the committed directory of that version: the version's
  *artifact*, the path an inference server loads while newer versions are written.
- ``<name>`` a link to the latest committed version's directory.

A new version is written aside in full, every file and the directory fsynced; then its version
link and then the latest link are swapped by ``rename``, the parent fsynced after each. A crash at
any point leaves the previous latest version whole; what it left half-done is swept later. Only
once the new version is durable are versions older than the newest ``keep_versions`` removed, and
never one that ``pinned`` names (a version an inference server is being moved onto right now).
A metadata-only change (a new epoch) writes a new directory for the same version, hard-linking its
tensor files, and re-points that version's link, so an artifact path stays valid across it.
DNS-1123 names never start with '.' or hold one, so the hidden entries cannot collide with an adapter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.errors import AdapterNotFound, InvalidInput, StorageFull
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.results import KeyedStep

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
META = "lorafleet.json"
FORMAT = 1
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
DEFAULT_KEEP_VERSIONS = 3
# After ".<name>.": a version link ("v00000007"), a version directory ("v00000007-<id>"), a link
# being swapped in ("link-<id>").
_ENTRY = re.compile(r"^v(?P<version>\d{8,})(?P<dir>-[0-9a-f]+)?$|^link-[0-9a-f]+$")


@dataclass(frozen=True)
class AdapterMeta:
    """What ``lorafleet.json`` records about one stored adapter."""

    adapter: AdapterId
    version: int
    epoch: int
    lora: LoraSpec
    training: TrainingSpec
    base_model: str
    # The adapter's latest keyed steps (idempotency keys), oldest first: a retry of one of them is
    # answered from here, also after a restart, since they are committed with the version.
    keyed: tuple[KeyedStep, ...] = ()

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
            "keyed": [k.to_json() for k in self.keyed],
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
            keyed=tuple(KeyedStep.from_json(k) for k in d.get("keyed", ())),
        )

    def keyed_step(self, key: str) -> KeyedStep | None:
        return next((k for k in self.keyed if k.key.key == key), None)

    def with_keyed(self, step: KeyedStep, kept: int) -> tuple[KeyedStep, ...]:
        """``keyed`` with ``step`` appended, the oldest dropped past ``kept``."""
        return (*self.keyed, step)[-kept:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_link(adapter: AdapterId, link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (a new link renamed over it), durably."""
    tmp = link.parent / f".{adapter.name}.link-{uuid.uuid4().hex[:12]}"
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(link.parent)


def _remove(entry: Path) -> None:
    if entry.is_symlink() or entry.is_file():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)


class VersionNotFound(AdapterNotFound):
    """The adapter exists but does not keep the asked-for version (never made, or pruned)."""


class AdapterStore:
    """Reads and atomically writes adapters under ``root``; counts every byte it moves.

    The newest ``keep_versions`` committed versions of each adapter stay loadable by path.
    """

    def __init__(self, root: Path, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> None:
        if isinstance(keep_versions, bool) or not isinstance(keep_versions, int) or keep_versions < 1:
            raise InvalidInput("must be an integer >= 1", field="keep_versions")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        # The publisher's in-flight loads: their versions outlive keep_versions until they end.
        self.pinned: Callable[[AdapterId], Collection[int]] = lambda adapter: ()
        self._counter_lock = threading.Lock()
        self.read_bytes = 0
        self.written_bytes = 0

    # ---- paths -------------------------------------------------------------------------
    def path(self, adapter: AdapterId) -> Path:
        """The adapter's directory as users see it (the link to its latest version)."""
        return self.root / adapter.namespace / adapter.name

    def version_path(self, adapter: AdapterId, version: int) -> Path:
        """The link naming ``version``'s directory (it exists while that version is kept)."""
        return self.root / adapter.namespace / f".{adapter.name}.v{version:08d}"

    @staticmethod
    def new_directory(adapter: AdapterId, version: int) -> str:
        """A fresh name for ``version``'s directory: no other write ever names it, neither of this
        version again nor of a version of an adapter created again under the same name."""
        return f".{adapter.name}.v{version:08d}-{uuid.uuid4().hex[:12]}"

    def artifact(self, adapter: AdapterId, version: int, directory: str | None = None) -> str:
        """``version``'s artifact path relative to the root: what a server that mounts the store
        loads. It is the version's own directory (``directory``, the name a write is about to use,
        or the one its version link names), not the link: an inference server keys what it caches
        (prefix-cache KV among it) by the path an adapter was loaded from, so no two versions and
        no two adapters ever created under one name may share a path."""
        if directory is None:
            link = self.version_path(adapter, version)
            try:
                directory = os.readlink(link)
            except OSError:  # not written (yet): the link's own name
                directory = link.name
        return f"{adapter.namespace}/{directory}"

    def exists(self, adapter: AdapterId) -> bool:
        return (self.path(adapter) / META).is_file()

    def iter_adapters(self) -> Iterator[AdapterId]:
        for ns in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for entry in sorted(ns.iterdir()):
                if not entry.name.startswith(".") and (entry / META).is_file():
                    yield AdapterId(ns.name, entry.name)

    def _entries(self, adapter: AdapterId) -> Iterator[tuple[Path, re.Match[str]]]:
        prefix = f".{adapter.name}."
        ns_dir = self.root / adapter.namespace
        if not ns_dir.is_dir():
            return
        for entry in ns_dir.iterdir():
            if entry.name.startswith(prefix) and (m := _ENTRY.fullmatch(entry.name[len(prefix) :])):
                yield entry, m

    def versions(self, adapter: AdapterId) -> list[int]:
        """The versions whose artifacts are kept, oldest first."""
        return sorted(int(m["version"]) for e, m in self._entries(adapter) if m["version"] and not m["dir"])

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
        # Resolve the link once so both files come from the same version even if a writer
        # swaps it between the two reads.
        current = self.path(adapter).resolve()
        try:
            weights = st_load(self._read(current / ADAPTER_WEIGHTS))
            opt = st_load(self._read(current / OPTIMIZER_STATE))
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {adapter} does not exist", field="adapter") from None
        exp_avg = {k[len("exp_avg.") :]: t for k, t in opt.items() if k.startswith("exp_avg.")}
        exp_avg_sq = {k[len("exp_avg_sq.") :]: t for k, t in opt.items() if k.startswith("exp_avg_sq.")}
        ema = {k[len("ema.") :]: t for k, t in opt.items() if k.startswith("ema.")} or None
        return StateBundle.from_tensors(weights, exp_avg, exp_avg_sq, step=int(opt["step"].item()), ema=ema)

    def read_files(
        self, adapter: AdapterId, names: tuple[str, ...], version: int | None = None
    ) -> dict[str, bytes]:
        """Several files of one version, the latest by default (its link is resolved once)."""
        link = self.path(adapter) if version is None else self.version_path(adapter, version)
        current = link.resolve()
        try:
            return {name: self._read(current / name) for name in names}
        except FileNotFoundError:
            if version is None or not self.exists(adapter):
                raise AdapterNotFound(f"adapter {adapter} does not exist", field="adapter") from None
            raise VersionNotFound(
                f"adapter {adapter} keeps no version {version}; it keeps {self.versions(adapter)}",
                field="version",
            ) from None

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
        directory: str | None = None,
    ) -> None:
        """Commit ``meta`` (+ ``tensors``) as the adapter's latest version, atomically.

        With ``tensors=None`` only the metadata changes (e.g. a new epoch): the tensor files of the
        current version are hard-linked into the new version directory, costing no copy. With
        ``adapter_config=None`` the current version's (immutable after creation) config is linked.
        ``directory``: the version directory's name, from :meth:`new_directory` (a fresh one when
        None), when the version's artifact was named before the write.
        """
        aside = self._write_aside(meta, tensors, adapter_config, directory)
        self._commit(meta, aside)

    def _write_aside(
        self,
        meta: AdapterMeta,
        tensors: StateBundle | None,
        adapter_config: Mapping[str, Any] | None,
        directory: str | None = None,
    ) -> Path:
        adapter = meta.adapter
        ns_dir = self.root / adapter.namespace
        ns_dir.mkdir(parents=True, exist_ok=True)
        aside = ns_dir / (directory or self.new_directory(adapter, meta.version))
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
                opt.update({f"ema.{k}": t.contiguous() for k, t in tensors.ema.items()})
                opt["step"] = torch.tensor([tensors.step], dtype=torch.int64)
                self._write_bytes(aside / OPTIMIZER_STATE, st_save(opt))
            self._write_bytes(aside / META, json.dumps(meta.to_json(), indent=2, sort_keys=True).encode())
            _fsync_dir(aside)
        except BaseException as exc:
            shutil.rmtree(aside, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                raise StorageFull(f"no space left to persist adapter {meta.adapter}: {exc}") from exc
            raise
        return aside

    def _commit(self, meta: AdapterMeta, aside: Path) -> None:
        # The version link first: once the latest link names a version, that version's artifact
        # path resolves. A crash between the two leaves a version link ahead of the latest; the
        # sweep drops it, and the latest version is still the one before, whole.
        try:
            _swap_link(meta.adapter, self.version_path(meta.adapter, meta.version), aside.name)
            _swap_link(meta.adapter, self.path(meta.adapter), aside.name)
        except BaseException:
            # Undo what a failed swap left: a version link ahead of the latest goes with its
            # directory; a re-pointed link of the latest version keeps the directory it names.
            with contextlib.suppress(OSError):
                self.sweep(meta.adapter)
            raise
        self.sweep(meta.adapter)

    def sweep(self, adapter: AdapterId) -> int:
        """Drop versions older than the newest ``keep_versions`` and what a crash left; count removals.

        A version's link goes before its directory, so a reader never finds a link to a half-removed
        directory. The latest version and what every kept link names always stay.
        """
        latest = self.path(adapter)
        current = latest.resolve().name if latest.is_symlink() else None
        current_version = -1
        links: dict[int, Path] = {}
        dirs: list[Path] = []
        stray: list[Path] = []
        for entry, m in self._entries(adapter):
            if m["version"] is None:
                stray.append(entry)  # a link that was never renamed into place
            elif m["dir"]:
                dirs.append(entry)
                if entry.name == current:
                    current_version = int(m["version"])
            else:
                links[int(m["version"])] = entry
        kept = sorted((v for v in links if v <= current_version), reverse=True)[: self.keep_versions]
        kept += [v for v in self.pinned(adapter) if v in links and v not in kept]
        removed = 0
        for version, link in links.items():
            if version not in kept:
                link.unlink(missing_ok=True)
                removed += 1
        if removed:
            _fsync_dir(latest.parent)
        wanted = {current} | {os.readlink(links[v]) for v in kept}
        for entry in [*stray, *(d for d in dirs if d.name not in wanted)]:
            _remove(entry)
            removed += 1
        return removed

    def delete(self, adapter: AdapterId) -> bool:
        """Remove the adapter; True if it existed. The latest link goes first, so readers see it gone."""
        link = self.path(adapter)
        if not link.is_symlink():
            return False
        link.unlink()
        _fsync_dir(link.parent)
        self.sweep(adapter)
        return True
