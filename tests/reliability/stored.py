"""Checks on an adapter as it lies on disk, read with nothing but json and safetensors.

A trainer may be killed at any instant; what it leaves must still be a whole adapter: the visible
path resolves to a version directory whose four files all parse, whose metadata names the expected
version, and whose tensors are finite. Every file under the storage root must be
JSON or safetensors, so nothing persisted can be a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "lorafleet.json")


def assert_whole(root: Path, namespace: str, name: str, version: int) -> dict[str, torch.Tensor]:
    """Assert the stored adapter is complete at ``version``; return its LoRA weights."""
    current = (root / namespace / name).resolve(strict=True)
    missing = [f for f in FILES if not (current / f).is_file()]
    assert not missing, f"{current} lacks {missing}"
    meta = json.loads((current / "lorafleet.json").read_text())
    assert meta["version"] == version, f"metadata says v{meta['version']}, the API said v{version}"
    json.loads((current / "adapter_config.json").read_text())
    weights = load_file(str(current / "adapter_model.safetensors"))
    optimizer = load_file(str(current / "optimizer.safetensors"))
    assert weights and optimizer
    for key, t in [*weights.items(), *optimizer.items()]:
        assert torch.isfinite(t.float()).all(), f"{key} is not finite"
    return weights


def unsafe_files(root: Path) -> list[Path]:
    """Files under ``root`` that are not plain JSON or safetensors (so could hold a pickle)."""
    found = []
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
                continue
            if p.suffix == ".safetensors":
                load_file(str(p))
                continue
        except (ValueError, OSError):
            pass
        found.append(p)
    return found
