"""Where the model lives between steps: GPU residency ``keep`` or ``offload``.

``keep`` moves the model to the device once. ``offload`` (the default on CUDA) keeps every weight
in a page-locked host tensor and, for the duration of one step, points each parameter and buffer
at a device copy made with one asynchronous copy per tensor; afterwards the parameters point back
at their host tensors and the device copies are freed, so CUDA memory returns to its level before
the step. On the CPU both modes are the same and cost nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MODES = ("offload", "keep")
_MOVED_STATE = ("exp_avg", "exp_avg_sq")  # AdamW's "step" stays a CPU scalar, as torch expects


class Residency:
    def __init__(self, device: torch.device, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"gpu_residency must be one of {MODES}, got {mode!r}")
        self.device = device
        self.mode = mode
        self.pinned_bytes = 0

    @property
    def offloading(self) -> bool:
        return self.device.type == "cuda" and self.mode == "offload"

    def attach(self, model: nn.Module) -> None:
        """Place a freshly loaded (or freshly extended) model for this residency mode."""
        if self.device.type != "cuda":
            return
        if self.mode == "keep":
            model.to(self.device)
            return
        total = 0
        for p in model.parameters():
            if not p.data.is_pinned():
                p.data = p.data.pin_memory()
            total += p.numel() * p.element_size()
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and not buf.is_pinned():
                    module._buffers[name] = buf.pin_memory()
        self.pinned_bytes = total

    @contextmanager
    def on_device(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Within the block the model (and ``optimizer``'s moments) are on ``self.device``."""
        if not self.offloading:
            yield
            return
        params = list(model.parameters())
        host_params = [p.data for p in params]
        buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
        states = list(optimizer.state.values()) if optimizer is not None else []
        host_states = [{k: st[k] for k in _MOVED_STATE} for st in states]
        try:
            for p in params:
                p.data = p.data.to(self.device, non_blocking=True)
            for m, n, b in buffers:
                m._buffers[n] = b.to(self.device, non_blocking=True)
            for st in states:
                for k in _MOVED_STATE:
                    st[k] = st[k].to(self.device, non_blocking=True)
            yield
        finally:
            for p, host in zip(params, host_params, strict=True):
                p.data = host
                p.grad = None
            for m, n, b in buffers:
                m._buffers[n] = b
            for st, host_st in zip(states, host_states, strict=True):
                st.update(host_st)
            torch.cuda.synchronize(self.device)
