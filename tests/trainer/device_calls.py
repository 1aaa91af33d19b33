"""Counting the calls that would cross between host and device, or wait on the device, on a GPU.

On the CPU nothing crosses and nothing waits, yet the calls that would are the same ones: a
``copy_``, a ``.to``/``.cpu`` naming a device, a ``torch.tensor`` built from Python data on a
device, and every read of a value into Python (``item``, ``tolist``, ``bool``/``float``/``int`` of
a tensor, a blocking ``.cpu``). A ``TorchFunctionMode`` sees each such call with its caller, so a
test can hold a step to the minimum without a GPU. Calls torch makes internally on CPU-only
scalars (AdamW's step count) are attributed to torch and reported apart.

Calls are attributed to the first frame outside this module: LoraFleet's own calls count in
``copies``/``syncs``; calls from torch, transformers or PEFT land in ``foreign`` by site, so a test
can check each against a reason it is not a crossing on a GPU (or see a new one appear).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
_HERE = __file__


def _names_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


@dataclass
class Counts:
    copies: int = 0
    syncs: int = 0
    ours: collections.Counter[str] = field(default_factory=collections.Counter)  # "kind name file:line"
    foreign: collections.Counter[str] = field(default_factory=collections.Counter)

    def record(self, kind: str, name: str) -> None:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename == _HERE:
            frame = frame.f_back
        path = frame.f_code.co_filename
        site = f"{kind} {name} {path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        if "/lorafleet_trainer/" not in path:
            self.foreign[site] += 1
            return
        self.ours[site] += 1
        if kind == "copy":
            self.copies += 1
        else:
            self.syncs += 1


class _Mode(TorchFunctionMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (
            name in ("copy_", "cuda", "pin_memory")
            or (name == "to" and _names_device(args, kwargs))
            or (name in ("tensor", "as_tensor") and kwargs.get("device") is not None)
        ):
            self.counts.record("copy", name)
        elif name == "cpu":
            self.counts.record("copy", name)
            self.counts.record("sync", name)
        elif name in _READS:
            self.counts.record("sync", name)
        return func(*args, **kwargs)


@contextmanager
def counting() -> Iterator[Counts]:
    counts = Counts()
    with _Mode(counts):
        yield counts
