"""An adapter's state bundle: LoRA weights, both AdamW moments, the EMA of the weights (what an EMA
teacher reads) and the step, in one flat buffer.

One type describes an adapter's trainable state wherever it lives: a cache entry (page-locked host
memory when CUDA is present), a slot's working copy (on the device, the PEFT parameters and the
AdamW moments are views into it), a snapshot buffer, and what storage reads and writes. Because the
state is one float32 buffer laid out as ``[weights | exp_avg | exp_avg_sq | ema]`` (keys in sorted
order), moving it between host and device is one copy each way, whatever the number of LoRA
tensors. The bundle also carries its identity (adapter, version, epoch): a copy of it says which
version of which adapter it holds, so the coherence check is one comparison.

Weights, gradients and moments stay float32 whatever the base model's dtype: a bf16 base trains
fp32 LoRA weights, and stored adapters load in PEFT and vLLM as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from lorafleet_trainer.ids import AdapterId

STATE_DTYPE = torch.float32
# weights, exp_avg, exp_avg_sq, and the EMA of the weights that an EMA teacher reads: the prefixes
# of ``as_dict``
SECTIONS = ("w", "m", "v", "e")
STEP_KEY = "step"


@dataclass(frozen=True)
class Layout:
    """The tensors of one LoRA shape: PEFT state-dict keys (no adapter name) and their shapes."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...] | torch.Size]) -> Layout:
        keys = tuple(sorted(shapes))
        return cls(keys, tuple(tuple(int(d) for d in shapes[k]) for k in keys))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, at = [], 0
        for shape in self.shapes:
            out.append(at)
            at += math.prod(shape)
        out.append(at)
        return tuple(out)

    @property
    def section_numel(self) -> int:
        """Elements of one section (all weights, or all of one moment)."""
        return self.offsets[-1]

    @property
    def numel(self) -> int:
        return len(SECTIONS) * self.section_numel

    @property
    def nbytes(self) -> int:
        return self.numel * STATE_DTYPE.itemsize


class StateBundle:
    """One adapter's state in one flat buffer, with views by section and key.

    ``adapter``/``version``/``epoch`` name the state it holds (None while it holds none, e.g. a
    slot between steps or a buffer about to be overwritten); ``step`` is AdamW's step count.
    """

    def __init__(self, layout: Layout, flat: torch.Tensor, step: int = 0) -> None:
        if flat.dtype != STATE_DTYPE or flat.dim() != 1 or flat.numel() != layout.numel:
            raise ValueError(f"a state buffer must be {layout.numel} {STATE_DTYPE} elements in one dimension")
        self.layout = layout
        self.flat = flat
        self.step = step
        self.adapter: AdapterId | None = None
        self.version = -1
        self.epoch = -1
        n = layout.section_numel
        self._sections = {s: flat[i * n : (i + 1) * n] for i, s in enumerate(SECTIONS)}

    @classmethod
    def empty(cls, layout: Layout, device: torch.device | str = "cpu", *, pin: bool = False) -> StateBundle:
        flat = torch.empty(layout.numel, dtype=STATE_DTYPE, device=device, pin_memory=pin)
        return cls(layout, flat)

    @classmethod
    def from_tensors(
        cls,
        weights: Mapping[str, torch.Tensor],
        exp_avg: Mapping[str, torch.Tensor],
        exp_avg_sq: Mapping[str, torch.Tensor],
        step: int,
        ema: Mapping[str, torch.Tensor] | None = None,
    ) -> StateBundle:
        """Pack separate host tensors (as storage reads them) into a new bundle.

        Without ``ema`` (an adapter stored before the EMA was kept) the EMA starts at the weights."""
        layout = Layout.of({k: t.shape for k, t in weights.items()})
        ema = weights if ema is None else ema
        for name, part in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("ema", ema)):
            if sorted(part) != list(layout.keys):
                raise ValueError(f"{name} keys do not match the weights' keys")
        bundle = cls.empty(layout)
        with torch.no_grad():
            for section, part in zip(SECTIONS, (weights, exp_avg, exp_avg_sq, ema), strict=True):
                for key, view in bundle.views(section).items():
                    view.copy_(part[key].reshape(view.shape))
        bundle.step = step
        return bundle

    # ---- identity -------------------------------------------------------------------------
    def label(self, adapter: AdapterId | None, version: int = -1, epoch: int = -1) -> None:
        self.adapter, self.version, self.epoch = adapter, version, epoch

    def has(self, adapter: AdapterId, version: int, epoch: int) -> bool:
        return self.adapter == adapter and self.version == version and self.epoch == epoch

    # ---- views ----------------------------------------------------------------------------
    def section(self, name: str) -> torch.Tensor:
        """One section as a flat view (``"w"`` is every weight, for one finiteness check)."""
        return self._sections[name]

    def views(self, section: str) -> dict[str, torch.Tensor]:
        flat, offsets = self._sections[section], self.layout.offsets
        return {
            k: flat[offsets[i] : offsets[i + 1]].view(shape)
            for i, (k, shape) in enumerate(zip(self.layout.keys, self.layout.shapes, strict=True))
        }

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self.views("w")

    @property
    def exp_avg(self) -> dict[str, torch.Tensor]:
        return self.views("m")

    @property
    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        return self.views("v")

    @property
    def ema(self) -> dict[str, torch.Tensor]:
        return self.views("e")

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor by ``w.``/``m.``/``v.``/``e.`` + key, and the step as a 1-element tensor."""
        out = {f"{s}.{k}": t for s in SECTIONS for k, t in self.views(s).items()}
        out[STEP_KEY] = torch.tensor([self.step], dtype=torch.int64)
        return out

    # ---- copies ---------------------------------------------------------------------------
    @torch.no_grad()
    def copy_from(self, other: StateBundle, *, non_blocking: bool = False) -> None:
        """This buffer becomes a copy of ``other`` (one copy, whichever devices they are on)."""
        if other.layout != self.layout:
            raise ValueError("state bundles of different LoRA layouts")
        self.flat.copy_(other.flat, non_blocking=non_blocking)
        self.step = other.step
        self.label(other.adapter, other.version, other.epoch)
