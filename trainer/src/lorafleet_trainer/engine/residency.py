"""Where the model lives between steps: GPU residency ``keep`` or ``offload``.

``keep`` moves the base model to the device once and leaves it there; slots keep their state on the
device too. It is the mode for a GPU the pod has to itself: nothing is uploaded per step but the
adapter state. ``offload`` is the mode for a GPU shared with other work (an inference server on the
same card): between steps the trainer holds no device memory. The base weights live in one flat
page-locked host buffer per dtype (each parameter a view of it), so a step uploads the base in one
copy per dtype into a device buffer, points the parameters at device views, and afterwards points
them back, drops the device buffers and returns the freed blocks to the driver (``empty_cache``),
so another process on the GPU can use them. The active slot's state gets a device buffer for the
step in the same way. On the CPU both modes are the same and cost nothing.

The base's host buffer is page-locked by registering ordinary memory with CUDA (exact size, unlike
the pinned allocator, which rounds every block up to a power of two and keeps freed blocks); if
registration fails it falls back to the pinned allocator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.engine.slots import LoraSlot

log = logging.getLogger(__name__)

MODES = ("offload", "keep")


class _FlatGroup:
    """The base tensors of one dtype as views of one flat host buffer."""

    def __init__(self, dtype: torch.dtype, tensors: list[tuple[nn.Module, str, bool]]) -> None:
        self.dtype = dtype
        self.slots = tensors  # (module, attribute, is_parameter)
        numels = [self._get(m, n, p).numel() for m, n, p in tensors]
        self.offsets = [sum(numels[:i]) for i in range(len(numels) + 1)]
        self.host = torch.empty(self.offsets[-1], dtype=dtype)
        self.registered = False

    @staticmethod
    def _get(module: nn.Module, name: str, is_param: bool) -> torch.Tensor:
        return module._parameters[name] if is_param else module._buffers[name]  # type: ignore[return-value]

    def point(self, flat: torch.Tensor) -> None:
        """Make every tensor of the group a view of ``flat`` (the host buffer or a device copy)."""
        for i, (module, name, is_param) in enumerate(self.slots):
            t = self._get(module, name, is_param)
            view = flat[self.offsets[i] : self.offsets[i + 1]].view(t.shape)
            if is_param:
                t.data = view
            else:
                module._buffers[name] = view

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


class Residency:
    def __init__(self, device: torch.device, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"gpu_residency must be one of {MODES}, got {mode!r}")
        self.device = device
        self.mode = mode
        self._groups: list[_FlatGroup] = []
        self.registered_bytes = 0  # page-locked outside the pinned allocator (its stats miss them)

    @property
    def offloading(self) -> bool:
        return self.device.type == "cuda" and self.mode == "offload"

    @property
    def slot_home(self) -> torch.device:
        """Where slot state rests between steps."""
        return torch.device("cpu") if self.offloading else self.device

    def attach(self, model: nn.Module) -> None:
        """Place a freshly loaded base model (before any slot exists) for this residency mode."""
        if self.device.type != "cuda":
            return
        if self.mode == "keep":
            model.to(self.device)
            return
        by_dtype: dict[torch.dtype, list[tuple[nn.Module, str, bool]]] = {}
        seen: set[int] = set()
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in table.items():
                    if t is None or id(t) in seen:  # tied weights are one parameter
                        continue
                    seen.add(id(t))
                    by_dtype.setdefault(t.dtype, []).append((module, name, is_param))
        for dtype, tensors in by_dtype.items():
            group = _FlatGroup(dtype, tensors)
            with torch.no_grad():
                for i, (m, n, p) in enumerate(tensors):
                    src = group._get(m, n, p)
                    group.host[group.offsets[i] : group.offsets[i + 1]].copy_(src.reshape(-1))
            self._pin(group)
            group.point(group.host)
            self._groups.append(group)

    def _pin(self, group: _FlatGroup) -> None:
        try:
            err = torch.cuda.cudart().cudaHostRegister(group.host.data_ptr(), group.nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
            group.registered = True
            self.registered_bytes += group.nbytes
        except Exception as exc:  # registration is an optimisation of the exact size only
            log.warning("page-locking the base weights by registration failed (%s); using pin_memory()", exc)
            group.host = group.host.pin_memory()

    @contextmanager
    def on_device(self, *slots: LoraSlot | None) -> Iterator[None]:
        """Within the block the base model (and each of ``slots``' state) are on ``self.device``.

        A fused step passes its shape's slot and every lane it trains (see ``fusing``).

        Each upload is one asynchronous copy per dtype from page-locked memory; nothing waits for
        it here (the step's first read orders after it on the same stream).
        """
        if not self.offloading:
            yield
            return
        try:
            for group in self._groups:
                group.point(group.host.to(self.device, non_blocking=True))
            for slot in slots:
                if slot is not None:
                    # No copy: the step's restore overwrites every byte of it.
                    slot.place(StateBundle.empty(slot.layout, self.device))
            yield
        finally:
            for group in self._groups:
                group.point(group.host)
            for slot in slots:
                if slot is not None:
                    slot.release()
            # The device buffers are unreferenced now: give their blocks back to the driver so the
            # GPU's other tenant can use them (the step already waited for its last copy; on a
            # failed step the driver's free waits for whatever was still queued).
            torch.cuda.empty_cache()
