"""Fused steps: the waiting steps of several adapters of one LoRA shape as one forward and backward.

A single step (``stepping``) trains one adapter in its shape's slot: PEFT applies one active
adapter to every row. A fused step trains K adapters of the same shape at once. Each adapter's
state is restored into a *lane* of its own (a :class:`LoraSlot` that is not part of the model: its
own bundle-backed LoRA tensors and its own AdamW), the K adapters' samples are packed into one
batch with their rows grouped by lane, and during the forward the slot's LoRA layers are switched
off in PEFT and routed through :class:`MultiLora` instead: a forward hook that adds, to each row
group, that group's own lane's ``B(A(x)) * scaling``. PEFT's own mixed-adapter batches refuse
training, hence a layer of our own.

One pass per micro-batch serves every lane: the teacher (the base, with the EMA lanes' EMA weights
routed to their rows for ``teacher: ema``), the base for the KL term when any lane has one, and the
student. Every adapter's loss is its own SDPO loss with its own :class:`TrainingSpec`, a token mean
over its own responses (each micro-batch weighted by its share of that adapter's tokens, as in
``stepping``), and one backward runs over their sum: no row reads another lane's weights, so each
lane's gradient is exactly the gradient its own step would have. Then every lane is checked,
clipped and updated on its own: a non-finite loss or gradient in one lane refuses that lane only.

Rows of different lanes never mix inside a layer: attention, norms and the LoRA delta are per row,
so a lane whose weights or loss are not finite cannot reach another lane's numbers.

The rows of a lane are contiguous, so the multi-LoRA layer needs no per-row gather of weights: when
every lane has as many rows, the lanes' products are two batched matmuls over the rows viewed as
[lanes, rows, ...]; otherwise one split of the rows and a pair of small matmuls per lane. Either
way the input's gradient is one tensor, not a zero-filled one per lane (what slicing each lane's
rows out of it costs in the backward: a fused step of 8 adapters on ``builtin:small`` spent 0.5 s
of its 9.8 s filling and summing those). Every teacher mode and the
KL term fuse exactly (the EMA teacher through the same routing, with the lanes' EMA weights); with
LoRA dropout above 0 each lane draws its own masks, so a fused step equals the sequential one in
distribution rather than bit for bit (as two runs of one step do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet_trainer.engine import stepping
from lorafleet_trainer.engine.slots import LoraSlot
from lorafleet_trainer.engine.storage import AdapterMeta
from lorafleet_trainer.errors import NonFiniteLoss
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import TrainingSpec
from lorafleet_trainer.results import StepRequest

# The bound on one fused step: adapters (lanes, each a state bundle on the device), sample rows and
# tokens (the longer of student and teacher per sample). Each forward is further bounded by the
# step token budget, as a single step's is.
DEFAULT_FUSE_MAX_ADAPTERS = 8
DEFAULT_FUSE_MAX_ROWS = 64
DEFAULT_FUSE_MAX_TOKENS = 32768

T = TypeVar("T")


@dataclass(frozen=True)
class Ready:
    """A request checked and prepared against the model, waiting for its (fused) step."""

    index: int  # in the caller's requests
    request: StepRequest
    meta: AdapterMeta
    spec: TrainingSpec
    prepared: list[stepping.Prepared]


# ---- which steps run together ------------------------------------------------------------------
def waves(adapters: Sequence[AdapterId]) -> list[list[int]]:
    """Request indices in waves that keep each adapter's order: a request joins the wave after its
    adapter's previous request, so one wave never holds two steps of one adapter and the waves,
    run one after another, apply every adapter's steps in the order they came."""
    out: list[list[int]] = []
    last: dict[AdapterId, int] = {}
    for i, adapter in enumerate(adapters):
        wave = last.get(adapter, -1) + 1
        if wave == len(out):
            out.append([])
        out[wave].append(i)
        last[adapter] = wave
    return out


def chunks(
    items: Sequence[T],
    rows: Callable[[T], int],
    tokens: Callable[[T], int],
    max_adapters: int,
    max_rows: int,
    max_tokens: int,
) -> list[list[T]]:
    """``items`` in order, cut into fused groups within the bounds; an item over a bound alone is a
    group of its own (it runs as a single step)."""
    out: list[list[T]] = []
    n_rows = n_tokens = 0
    for item in items:
        r, t = rows(item), tokens(item)
        if out and len(out[-1]) < max_adapters and n_rows + r <= max_rows and n_tokens + t <= max_tokens:
            out[-1].append(item)
            n_rows, n_tokens = n_rows + r, n_tokens + t
        else:
            out.append([item])
            n_rows, n_tokens = r, t
    return out


def sample_tokens(prepared: Sequence[stepping.Prepared]) -> int:
    """What a step puts in a forward: per sample, the longer of its student and teacher rows."""
    return sum(max(len(p.student_ids), len(p.teacher_ids)) for p in prepared)


# ---- the multi-LoRA layer ----------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One LoRA layer of a slot: the PEFT module, its state keys and its scaling."""

    module: nn.Module
    a_key: str
    b_key: str
    scaling: float
    dropout: float


# The LoRA weights a group of rows uses, by state key (None: the group adds nothing, the base alone).
Weights = Mapping[str, torch.Tensor] | None


@dataclass(frozen=True)
class Group:
    """Consecutive rows ``[start, end)`` of a forward that use one lane's weights."""

    start: int
    end: int
    weights: Weights


class MultiLora:
    """The LoRA layers of one slot, routed so that each group of rows uses its own weights."""

    def __init__(self, peft_model: Any, slot: LoraSlot) -> None:
        from peft.tuners.lora import LoraLayer

        self.peft_model = peft_model
        sites = []
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and slot.name in module.lora_A:
                a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
                if a_key not in slot.params or b_key not in slot.params:
                    raise ValueError(f"slot {slot.name} has no state for the LoRA layer {name}")
                dropout = module.lora_dropout[slot.name]
                sites.append(
                    Site(
                        cast(nn.Module, module),
                        a_key,
                        b_key,
                        float(module.scaling[slot.name]),
                        float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
                    )
                )
        if len(sites) * 2 != len(slot.keys):
            raise ValueError(f"slot {slot.name}: {len(sites)} LoRA layers for {len(slot.keys)} tensors")
        self.sites = tuple(sites)

    @contextmanager
    def routed(self, groups: Sequence[Group]) -> Iterator[None]:
        """Within the block PEFT's own LoRA path is off and every LoRA layer adds each group's
        ``B(A(dropout(x))) * scaling`` to that group's rows (the same terms PEFT computes)."""
        with self.peft_model.disable_adapter():
            handles = [site.module.register_forward_hook(self._hook(site, groups)) for site in self.sites]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    @staticmethod
    def _hook(site: Site, groups: Sequence[Group]) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
        sizes = [g.end - g.start for g in groups]
        bare = all(g.weights is None for g in groups)  # every row through the base alone
        # Groups of one size: the lanes' products as two batched matmuls over [groups, rows, ...].
        even = len(set(sizes)) == 1 and all(g.weights is not None for g in groups)

        def add_lora(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if bare:
                return output
            x = args[0]
            weights = [g.weights for g in groups]
            a0 = next(w for w in weights if w is not None)[site.a_key]
            x = x.to(a0.dtype)
            if site.dropout > 0.0:
                x = F.dropout(x, site.dropout, module.training)
            # The scaling applied on the rank-r side: a tensor out_features/r times smaller than
            # PEFT's product (and exact for the usual power-of-two alpha / r).
            if even:
                a = torch.stack([cast(Mapping[str, torch.Tensor], w)[site.a_key] for w in weights])
                b = torch.stack([cast(Mapping[str, torch.Tensor], w)[site.b_key] for w in weights])
                h = torch.bmm(x.reshape(len(groups), -1, x.shape[-1]), a.transpose(1, 2)) * site.scaling
                delta = torch.bmm(h, b.transpose(1, 2)).reshape(output.shape)
                return output + delta
            # Row groups of different sizes: one split (its backward is one concatenation, not a
            # zero-filled gradient per group) and a pair of matmuls per group.
            parts = []
            for rows, w in zip(x.split(sizes), weights, strict=True):
                if w is None:
                    parts.append(output.new_zeros((rows.shape[0], *output.shape[1:])))
                    continue
                parts.append(F.linear(F.linear(rows, w[site.a_key]) * site.scaling, w[site.b_key]))
            # One sum over every row, as PEFT adds its one adapter's product.
            return output + (parts[0] if len(parts) == 1 else torch.cat(parts))

        return add_lora


# ---- lanes -------------------------------------------------------------------------------------
class Lanes:
    """The lanes of one slot (created as needed, up to the fused bound) and its multi-LoRA layer.

    A lane keeps the state of the last adapter it trained, labelled as a slot's is, so the next
    fused step of that adapter on a cache hit restores nothing (``LoraSlot.restore``).
    """

    def __init__(self, peft_model: Any, slot: LoraSlot, home: torch.device, pin: bool) -> None:
        self.slot = slot
        self.multi = MultiLora(peft_model, slot)
        self.home = home
        self.pin = pin
        self._lanes: list[LoraSlot] = []

    def _new(self) -> LoraSlot:
        params = {
            k: nn.Parameter(torch.empty(shape, dtype=torch.float32, device=self.home))
            for k, shape in zip(self.slot.layout.keys, self.slot.layout.shapes, strict=True)
        }
        return LoraSlot(
            f"{self.slot.name}.lane{len(self._lanes)}", self.slot.lora, params, self.home, self.pin
        )

    def take(self, adapters: Sequence[AdapterId]) -> list[LoraSlot]:
        """One lane per adapter (distinct adapters): the lane already holding it when there is one."""
        while len(self._lanes) < len(adapters):
            self._lanes.append(self._new())
        free = list(self._lanes)
        out: list[LoraSlot | None] = []
        for adapter in adapters:
            held = next((lane for lane in free if lane.state.adapter == adapter), None)
            if held is not None:
                free.remove(held)
            out.append(held)
        for i, lane in enumerate(out):
            if lane is None:
                # Prefer lanes that hold nobody asked for now: they are the ones to overwrite.
                lane = free.pop()
                out[i] = lane
        return [lane for lane in out if lane is not None]


# ---- the fused batch ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """The rows of one lane inside one micro-batch, and its response tokens there."""

    lane: int
    rows: tuple[int, int]  # within the micro-batch
    tokens: tuple[int, int]  # within the micro-batch's response tokens


@dataclass(frozen=True)
class FusedBatch:
    """Every lane's prepared samples packed as one :class:`stepping.Batch`, rows grouped by lane,
    and for each micro-batch which rows belong to which lane."""

    batch: stepping.Batch
    spans: tuple[tuple[Span, ...], ...]  # per micro-batch
    lane_tokens: tuple[int, ...]  # response tokens per lane over the whole step
    lane_rows: tuple[int, ...]

    @classmethod
    def pack(
        cls, per_lane: Sequence[Sequence[stepping.Prepared]], pin: bool, token_budget: int
    ) -> FusedBatch:
        lane_of = [lane for lane, prepared in enumerate(per_lane) for _ in prepared]
        batch = stepping.Batch.pack([p for prepared in per_lane for p in prepared], pin, token_budget)
        spans = []
        first = 0
        for micro in batch.micro:
            own: list[Span] = []
            token = 0
            for row, n in enumerate(micro.lengths):
                lane = lane_of[first + row]
                if own and own[-1].lane == lane:
                    last = own[-1]
                    own[-1] = Span(lane, (last.rows[0], row + 1), (last.tokens[0], token + n))
                else:
                    own.append(Span(lane, (row, row + 1), (token, token + n)))
                token += n
            spans.append(tuple(own))
            first += len(micro.lengths)
        return cls(
            batch,
            tuple(spans),
            tuple(sum(len(p.response_ids) for p in prepared) for prepared in per_lane),
            tuple(len(prepared) for prepared in per_lane),
        )


# ---- the fused step ----------------------------------------------------------------------------
Outcome = dict[str, float] | NonFiniteLoss


def train_step(
    model: Any,
    lanes: Lanes,
    taken: Sequence[LoraSlot],
    specs: Sequence[TrainingSpec],
    fused: FusedBatch,
    device: torch.device,
    dtype: torch.dtype,
) -> list[Outcome]:
    """One SDPO update of every lane in ``taken`` from one fused forward and backward.

    Returns each lane's metrics (as ``stepping.train_step`` gives them), or the
    :class:`NonFiniteLoss` that refused that lane's update; an error of the shared computation
    (out of memory, say) is raised, and then no lane was updated.
    """
    for lane, spec in zip(taken, specs, strict=True):
        for group in lane.optimizer.param_groups:
            group["lr"] = spec.learning_rate
        lane.optimizer.zero_grad(set_to_none=True)
    try:
        rows = _loss_and_gradients(model, lanes, taken, specs, fused, device, dtype)
    except BaseException:
        for lane in taken:
            lane.optimizer.zero_grad(set_to_none=True)
        raise
    out: list[Outcome] = []
    for lane, spec, values, tokens, n in zip(
        taken, specs, rows, fused.lane_tokens, fused.lane_rows, strict=True
    ):
        metrics = dict(zip(stepping.METRIC_NAMES, values, strict=True))
        refused = stepping.refusal(metrics)
        if refused is not None:
            lane.optimizer.zero_grad(set_to_none=True)
            out.append(refused)
            continue
        out.append(stepping.apply(lane, spec, metrics, tokens, n))
    return out


def _loss_and_gradients(
    model: Any,
    lanes: Lanes,
    taken: Sequence[LoraSlot],
    specs: Sequence[TrainingSpec],
    fused: FusedBatch,
    device: torch.device,
    dtype: torch.dtype,
) -> list[list[float]]:
    """The graph-building part, in a frame of its own (see ``stepping._loss_and_gradients``).

    Per micro-batch: the teacher pass (EMA lanes' rows through their EMA weights, the others
    through the bare base), the base pass if any of its lanes has a KL weight, the student pass
    with every row through its lane's weights, then one backward of the sum of the lanes' losses.
    Returns per lane the five loss figures and the gradient norm, read from the device at once.
    """
    batch = fused.batch
    packed = batch.upload(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    responses = packed[batch.response[0] : batch.response[1]]
    old_logprobs = packed[batch.logprobs[0] : batch.logprobs[1]].view(torch.float64)
    sums = torch.zeros(len(taken), 5, dtype=torch.float32, device=device)
    student_weights = [{k: lane.params[k] for k in lane.keys} for lane in taken]
    ema_weights = [
        lane.state.ema if spec.teacher == "ema" else None for lane, spec in zip(taken, specs, strict=True)
    ]
    dropout = lanes.slot.lora.dropout > 0.0
    for micro, spans in zip(batch.micro, fused.spans, strict=True):
        model.eval()
        base = None
        with autocast, torch.no_grad():
            teachers = [Group(*s.rows, ema_weights[s.lane]) for s in spans]
            routing = (
                lanes.multi.routed(teachers)
                if any(g.weights is not None for g in teachers)
                else model.disable_adapter()
            )
            with routing:
                teacher = stepping.response_logits(model, packed, micro.teacher, micro.lengths, micro.picks)
            if any(specs[s.lane].kl_reg_weight > 0.0 for s in spans):
                with model.disable_adapter():
                    base = stepping.response_logits(model, packed, micro.student, micro.lengths, micro.picks)
        model.train(dropout)
        try:
            with autocast, lanes.multi.routed([Group(*s.rows, student_weights[s.lane]) for s in spans]):
                student = stepping.response_logits(model, packed, micro.student, micro.lengths, micro.picks)
        finally:
            model.eval()
        total: torch.Tensor | None = None
        first = micro.response[0]
        # The lanes' token ranges partition the rows' tokens in order. One split, not a slice per
        # lane: a slice's backward fills a zero tensor of the whole logits' size for each lane
        # (8 lanes of 889 tokens on a 49,152-token vocabulary: 8 fills of 174 MB, 1.7 s a step).
        own = student.split([s.tokens[1] - s.tokens[0] for s in spans])
        for s, student_rows in zip(spans, own, strict=True):
            spec = specs[s.lane]
            a, b = s.tokens
            terms = stepping.spec_loss(
                spec,
                student_rows,
                teacher[a:b],
                responses[first + a : first + b],
                old_logprobs[first + a : first + b],
                base[a:b] if base is not None and spec.kl_reg_weight > 0.0 else None,
            )
            share = (b - a) / fused.lane_tokens[s.lane]
            weighted = terms.total * share if share != 1.0 else terms.total
            total = weighted if total is None else total + weighted
            sums[s.lane] += stepping.figures(terms) * share
        if total is not None:
            total.backward()
        del student, own, teacher, base, total
    norms = [
        torch.nn.utils.clip_grad_norm_([lane.params[k] for k in lane.keys], spec.max_grad_norm).to(sums.dtype)
        for lane, spec in zip(taken, specs, strict=True)
    ]
    out = torch.cat([sums, torch.stack(norms).reshape(-1, 1)], dim=1)
    values: list[list[float]] = out.tolist()  # the fused step's one read from the device
    return values
