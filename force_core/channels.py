"""Structured pruning at initialization: whole channels, given as plain-data groups, scored by FORCE,
Iterative SNIP, SNIP, magnitude or random, and kept by an exact rule to a budget of prunable weights.

Which slices of which parameters move together (the groups) is the caller's analysis (e.g. of an ONNX
graph); this module knows nothing of ONNX. Pure PyTorch: imports torch and the stdlib only.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from force_core.batches import BatchStream
from force_core.collapse import COLLAPSE_RATIO, OutputSpread, check_collapse_args, guarded_force
from force_core.engine import check_run_args, numerics, training_mode
from force_core.maskset import MaskSet
from force_core.params import prunable_parameters
from force_core.progress import Progress, ScheduleMixin, density_schedule, kept_count
from force_core.registry import get_method, register_method
from force_core.select import tie_priority


@dataclass(frozen=True)
class ChannelSlice:
    param: str  # name in model.named_parameters()
    dim: int  # the axis of that parameter the channels index
    offset: int = 0  # entries along `dim` before channel 0 of this group (e.g. a Concat offset)
    block: int = 1  # entries per channel along `dim` (e.g. H*W rows when a Flatten feeds a Gemm)
    # channel c of the group covers entries [offset + c*block, offset + (c+1)*block) along dim
    consumer: bool = False  # the slice reads the channels (a layer's input weights), rather than producing them


@dataclass(frozen=True)
class ChannelGroup:
    name: str
    size: int  # channels in the group
    # every parameter slice that belongs to these channels: producers' output weights, consumers' input
    # weights, biases, norm scale/shift, ...
    slices: tuple[ChannelSlice, ...]
    min_keep: int = 1  # a layer never loses all its channels


@dataclass
class ChannelMasks:
    keep: dict[str, torch.Tensor]  # group name -> bool tensor [size] (True = channel kept)
    # element masks over the `prunable` params (False where a pruned channel's slice lies; params in no group all True)
    masks: MaskSet
    meta: dict  # method, structure="channel", densities, kept/total weights and channels, per group, steps, ...


def _check_groups(groups: Sequence[ChannelGroup], shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise ValueError naming the group, the slice and the valid range for anything that does not fit."""
    seen = set()
    for g in groups:
        if g.name in seen:
            raise ValueError(f"two channel groups are named {g.name!r}: group names must be unique")
        seen.add(g.name)
        if not isinstance(g.size, int) or g.size < 1:
            raise ValueError(f"channel group {g.name!r}: size must be an integer >= 1, got {g.size!r}")
        if not isinstance(g.min_keep, int) or not 1 <= g.min_keep <= g.size:
            raise ValueError(f"channel group {g.name!r}: min_keep must be in [1, {g.size}], got {g.min_keep!r}")
        if not g.slices:
            raise ValueError(f"channel group {g.name!r} has no slices")
        for s in g.slices:
            if s.param not in shapes:
                raise ValueError(f"channel group {g.name!r}: {s.param!r} is not a parameter of the model")
            shape = tuple(shapes[s.param])
            if not -len(shape) <= s.dim < len(shape):
                raise ValueError(
                    f"channel group {g.name!r}: dim {s.dim} of {s.param!r} (shape {shape}) "
                    f"is outside [{-len(shape)}, {len(shape) - 1}]"
                )
            if s.offset < 0 or s.block < 1 or s.offset + g.size * s.block > shape[s.dim]:
                raise ValueError(
                    f"channel group {g.name!r}: offset {s.offset} + {g.size} channels x block {s.block} along dim "
                    f"{s.dim} of {s.param!r} (shape {shape}) needs offset >= 0, block >= 1 and "
                    f"offset + size*block <= {shape[s.dim]}"
                )


class _Layout:
    """Where the channels of `groups` lie, as two index vectors over the concatenated axes (param, dim)
    that slices cover: entry `pos[e]` of those axes belongs to channel `chan[e]` of the concatenated
    groups. A channel mask then gives every axis's kept entries in one gather and one scatter; an
    element mask is the outer AND of its parameter's axes (an entry is pruned when any channel it
    belongs to, along any axis, is pruned). The axes of the `counted` parameters come first."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        groups: Sequence[ChannelGroup],
        counted: Sequence[str],
        device: torch.device | str,
        costs: Mapping[str, int] | None = None,
    ):
        self.device = torch.device(device)
        self.shapes = {n: tuple(shapes[n]) for n in [*counted, *(s.param for g in groups for s in g.slices)]}
        self.counted = list(counted)
        self.dims = {n: sorted({s.dim % len(self.shapes[n]) for g in groups for s in g.slices if s.param == n})
                     for n in self.shapes}  # fmt: skip
        self.axes: dict[tuple[str, int], int] = {}  # (param, dim) -> its first entry in the concatenation
        lengths = []
        for n in self.shapes:  # counted parameters first (dict order)
            for d in self.dims[n]:
                self.axes[(n, d)] = sum(lengths)
                lengths.append(self.shapes[n][d])
        self.n_entries = sum(lengths)
        n_counted_entries = sum(self.shapes[n][d] for n in self.counted for d in self.dims[n])
        starts = list(itertools.accumulate((g.size for g in groups), initial=0))
        self.n_channels = starts[-1]
        pos, chan = [], []
        for g, start in zip(groups, starts, strict=False):
            for s in g.slices:
                first = self.axes[(s.param, s.dim % len(self.shapes[s.param]))] + s.offset
                pos.append(torch.arange(first, first + g.size * s.block))
                chan.append(torch.arange(start, start + g.size).repeat_interleave(s.block))
        self.pos = torch.cat(pos).to(self.device)
        self.chan = torch.cat(chan).to(self.device)
        weights = self.pos < n_counted_entries  # entries of the counted parameters' axes
        self.pos_w, self.chan_w = self.pos[weights], self.chan[weights]
        self.axis_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        self.axis_of = self.axis_of.to(self.device)
        # Kept weights of a counted parameter: the product of its uncovered dims (`count_const`) and of the kept
        # entries of each covered axis (`count_rows`: axis numbers, padded with len(lengths), a constant 1).
        number = {key: i for i, key in enumerate(self.axes)}
        width = max((len(self.dims[n]) for n in self.counted), default=0)
        rows = [[number[(n, d)] for d in self.dims[n]] + [len(lengths)] * (width - len(self.dims[n]))
                for n in self.counted]  # fmt: skip
        self.count_rows = torch.tensor(rows, dtype=torch.long).view(len(self.counted), width).to(self.device)
        self.count_const = torch.tensor(
            [math.prod(s for d, s in enumerate(self.shapes[n]) if d not in self.dims[n]) for n in self.counted],
            dtype=torch.long,
            device=self.device,
        )
        # What one weight of each counted parameter costs in the budget's unit (1: a parameter budget; MACs per
        # image: a compute budget); `total` and `kept` are in that unit.
        self.costs = {n: int(costs[n]) if costs is not None else 1 for n in self.counted}
        self.cost = torch.tensor([self.costs[n] for n in self.counted], dtype=torch.long, device=self.device)
        self.total_weights = sum(math.prod(self.shapes[n]) for n in self.counted)
        self.total = sum(math.prod(self.shapes[n]) * self.costs[n] for n in self.counted)
        self.scored = [n for n in self.counted if self.dims[n]]  # counted parameters that channels cut

    def axis_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Flat bool over the concatenated axes: False where an entry belongs to a pruned channel."""
        out = torch.ones(self.n_entries, dtype=torch.bool, device=self.device)
        return out.index_fill_(0, self.pos[keep.logical_not()[self.chan]], False)

    def kept_per_param(self, keep: torch.Tensor) -> torch.Tensor:
        """Kept weights of each counted parameter (int64, in `counted` order)."""
        per_axis = torch.zeros(len(self.axes) + 1, dtype=torch.long, device=self.device)
        per_axis.index_add_(0, self.axis_of, self.axis_keep(keep).long())
        per_axis[-1] = 1
        return per_axis[self.count_rows].prod(1) * self.count_const

    def kept(self, keep: torch.Tensor) -> int:
        """What the kept weights cost, in the budget's unit (weights when every cost is 1)."""
        return int((self.kept_per_param(keep) * self.cost).sum())

    def kept_weights(self, keep: torch.Tensor) -> int:
        """The kept weights of the counted parameters, whatever the budget's unit."""
        return int(self.kept_per_param(keep).sum())

    def channel_costs(self, weights: bool = False) -> torch.Tensor:
        """Per channel (float32), what its entries in the counted parameters cost with every other channel kept
        (`weights`: how many they are): the price of a channel in the greedy knapsack of `ChannelContext.keep_top`."""
        return self.channel_sums({n: torch.full(self.shapes[n], 1.0 if weights else float(self.costs[n]),
                                                device=self.device) for n in self.scored})

    def element_masks(self, keep: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """name -> bool mask of the parameter's shape (all True where no group reaches it)."""
        ak = self.axis_keep(keep)
        out = {}
        for n in names:
            shape = self.shapes[n]
            m = torch.ones(shape, dtype=torch.bool, device=self.device)
            for d in self.dims.get(n, ()):
                first = self.axes[(n, d)]
                view = [1] * len(shape)
                view[d] = shape[d]
                m.logical_and_(ak[first : first + shape[d]].view(view))
            out[n] = m
        return out

    def channel_sums(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per channel (float32), the sum of `tensors[n]` (shaped like parameter n, for every n in `scored`)
        over the channel's entries in the counted parameters."""
        parts = []
        for n in self.scored:
            t = tensors[n]
            for d in self.dims[n]:
                others = [i for i in range(t.dim()) if i != d]
                parts.append(t.sum(dim=others) if others else t)
        along = torch.cat(parts).float()
        sums = torch.zeros(self.n_channels, dtype=torch.float32, device=self.device)
        return sums.index_add_(0, self.chan_w, along[self.pos_w])


def channel_element_masks(
    shapes: Mapping[str, Sequence[int]],
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    params: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Element masks (name -> bool tensor of that shape) of the parameters `params` for the kept channels
    `keep` (group name -> bool [size]): an entry is False when any channel it belongs to, along any axis, is
    pruned; entries no group covers stay True. `params` may name biases and norm parameters as well as
    weights (all of them need masking for the masked network to equal the cut one)."""
    _check_groups(groups, shapes)
    missing = [n for n in params if n not in shapes]
    if missing:
        raise ValueError(f"params not in shapes: {missing[:5]}")
    names = {g.name for g in groups}
    if set(keep) != names:
        raise ValueError(f"keep must have one entry per group: missing {sorted(names - set(keep))[:5]}, "
                         f"unknown {sorted(set(keep) - names)[:5]}")  # fmt: skip
    for g in groups:
        k = keep[g.name]
        if k.dtype != torch.bool or tuple(k.shape) != (g.size,):
            raise ValueError(f"keep[{g.name!r}] must be a bool tensor of shape ({g.size},), "
                             f"got {k.dtype} {tuple(k.shape)}")  # fmt: skip
    device = next(iter(keep.values())).device if keep else torch.device("cpu")
    if not groups:
        return {n: torch.ones(tuple(shapes[n]), dtype=torch.bool, device=device) for n in params}
    flat = torch.cat([keep[g.name].to(device) for g in groups])
    return _Layout(shapes, groups, list(params), device).element_masks(flat, params)


class ChannelContext(ScheduleMixin):
    """What a channel method works with: `scores` and `keep` hold one entry per channel (the channel-prunable
    groups concatenated, in order). A method writes `scores` (`saliency`, `magnitude_`, `random_`), calls
    `keep_top(k)` and reports each step with `report`; `kept_cost` is what the kept prunable weights cost in the
    budget's unit (their count under a parameter budget, their MACs under a compute budget: `_Layout.costs`).
    `schedule` and `report` are the engine's (ScheduleMixin): (t, d_t, round(d_t·N)), N the prunable weights."""

    def __init__(
        self,
        model: nn.Module,
        layout: _Layout,
        groups: Sequence[ChannelGroup],
        batches: BatchStream | None,
        *,
        density: float,
        steps: int,
        schedule: str,
        loss_fn: Callable,
        batches_per_step: int,
        seed: int,
        progress: Progress | None,
        multiple: int = 1,
        on_collapse: str = "nested",
        collapse_ratio: float = COLLAPSE_RATIO,
        weight_density: float | None = None,
        per_group: bool = False,
    ):
        self.model, self.layout, self.groups, self.batches = model, layout, list(groups), batches
        self.on_collapse, self.spread = on_collapse, OutputSpread(collapse_ratio)
        self.collapse_step: int | None = None  # the step whose saliencies found the network collapsed
        self._previous: torch.Tensor | None = None
        self._last_x: torch.Tensor | None = None
        self.density, self.steps, self.schedule_kind = density, steps, schedule
        self.loss_fn, self.batches_per_step, self.seed, self.progress = loss_fn, batches_per_step, seed, progress
        self.device = layout.device
        params = dict(model.named_parameters())
        # The dense initial values of every parameter a slice reaches (weights, biases, norms), never written.
        self.theta0 = {n: params[n].detach() for n in layout.shapes if layout.dims[n]}
        self.numel = layout.total
        self.k = kept_count(density, self.numel)
        c = layout.n_channels
        self.scores = torch.zeros(c, dtype=torch.float32, device=self.device)
        self.keep = torch.ones(c, dtype=torch.bool, device=self.device)
        self.kept_cost = self.numel
        sizes = torch.tensor([g.size for g in self.groups], device=self.device)
        self._group_of = torch.repeat_interleave(torch.arange(len(self.groups), device=self.device), sizes)
        self._group_start = sizes.cumsum(0) - sizes
        # Selection works on blocks of `multiple` channels of a group (its best, its next best, ...; the last one
        # shorter), so that kept counts are multiples of it: runtimes lay channels out in blocks (onnxruntime's
        # NCHWc: 8 on AVX2, 16 on AVX-512; tensor cores: 8), and a count off the block runs at the next one's cost.
        self.multiple = multiple
        # A weighted budget (MACs) is a knapsack: blocks are ranked by score per unit of cost, the greedy order
        # whose longest prefix within k loses at most the score of the first block left out against the best
        # selection of whole blocks. A parameter budget ranks by score alone, as FORCE ranks weights.
        self._price = layout.channel_costs() if any(c != 1 for c in layout.costs.values()) else None
        # A second budget, in weights, beside a weighted one (`weight_density`): channels must fit both, so a cut can
        # meet a latency and a file size at once. It follows the same schedule; `weight_cap` is the step's.
        self.weight_density = weight_density
        self._weight_price = layout.channel_costs(weights=True) if weight_density is not None else None
        self.weight_cap = None if weight_density is None else kept_count(weight_density, layout.total_weights)
        # Scores ranked within their group (`ranking_scores`): each group's mean becomes 1, so a priced budget spreads
        # by what channels cost rather than by the groups' scales. At init, connection sensitivity falls with depth:
        # ranked globally under a latency budget, resnet50's last blocks kept 16 of 512 channels and the cut held
        # 0.129× the parameters at Torch-Pruning's latency; ranked per group, 0.272× (benchmarks/bench_peer.py).
        self.per_group = per_group
        blocks = (sizes + multiple - 1) // multiple
        self._n_blocks = int(blocks.sum())
        self._block_start = blocks.cumsum(0) - blocks
        self._min_blocks = torch.tensor([-(-g.min_keep // multiple) for g in self.groups], device=self.device)
        self._by_priority = torch.sort(tie_priority(c, self.device, seed), descending=True, stable=True).indices
        # Saliency masks only the slices that read a channel (FORCE.md: the gradient of a pruned weight is not
        # blocked): a pruned channel is still computed, unread, so its consumers' gradients keep ranking it and it
        # can come back. Unread, it changes nothing downstream: the masked network is the cut one. A group with no
        # consumer slice is masked on every slice.
        reading = [replace(g, slices=tuple(s for s in g.slices if s.consumer) or g.slices) for g in self.groups]
        self.read_layout = _Layout(layout.shapes, reading, [], self.device)
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}  # training-mode forwards update the clones
        self.losses: list[float] = []

    def schedule(self) -> Iterator[tuple[int, float, int]]:
        """The engine's (t, d_t, k_t), setting `weight_cap` to step t's share of the weight budget on the way."""
        caps = (density_schedule(self.weight_density, self.steps, self.schedule_kind)
                if self.weight_density is not None else None)
        for t, d, k in super().schedule():
            if caps is not None:
                self.weight_cap = kept_count(caps[t - 1], self.layout.total_weights)
            yield t, d, k

    # ---- scores
    def saliency(self) -> torch.Tensor:
        """scores ← |Σ θ0 · ∂L/∂(θ0⊙m)| over each channel's entries in the prunable weights: the gradient at
        the network with the current channel mask applied to the slices that read the channels, times the dense
        θ0 (FORCE.md, Saliency, with one gate per channel), summed over the next `batches_per_step` batches.
        A pruned channel is still produced, so its consumers' gradients score it (a group without consumer
        slices is masked on every slice, and its pruned channels score 0)."""
        masked_names = [n for n in self.theta0 if self.read_layout.dims.get(n)]
        masks = self.read_layout.element_masks(self.keep, masked_names)
        with torch.no_grad():
            masked = {n: self.theta0[n] * masks[n] if n in masks else self.theta0[n].clone() for n in self.theta0}
        ws = [masked[n].requires_grad_(True) for n in self.layout.scored]
        total = None
        for x, y in self.batches.take(self.batches_per_step):
            out = functional_call(self.model, {**masked, **self.buffers}, (x,))
            self.spread.record(out)
            self._last_x = x
            loss = self.loss_fn(out, y)
            grads = torch.autograd.grad(loss, ws, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, ws, strict=True)]
            total = grads if total is None else torch._foreach_add(total, grads)
            self.losses.append(float(loss.detach()))
        with torch.no_grad():
            prods = {n: self.theta0[n] * g for n, g in zip(self.layout.scored, total, strict=True)}
            return self.scores.copy_(self.layout.channel_sums(prods)).abs_()

    @torch.no_grad()
    def magnitude_(self) -> torch.Tensor:
        """scores ← mean |θ0| over each channel's prunable entries (a mean, so that wide layers compare)."""
        theta = {n: self.theta0[n] for n in self.layout.scored}
        sums = self.layout.channel_sums({n: t.abs() for n, t in theta.items()})
        counts = self.layout.channel_sums({n: torch.ones_like(t) for n, t in theta.items()})
        return self.scores.copy_(sums / counts)

    @torch.no_grad()
    def random_(self) -> torch.Tensor:
        """scores ← uniform draws from a CPU generator seeded with `seed` (the same on every device)."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return self.scores.copy_(torch.rand(self.scores.numel(), generator=gen))

    @torch.no_grad()
    def drop_pruned_(self) -> None:
        """Give pruned channels the minimum score: they never come back (nested masks)."""
        self.scores.masked_fill_(self.keep.logical_not(), -math.inf)

    # ---- collapse (force_core.collapse): judged on the masked network, which computes what the cut one does
    def collapsed(self) -> bool:
        """Whether the last forward pass (`saliency`'s) found the outputs no longer spread over the batch."""
        return self.spread.collapsed()

    @torch.no_grad()
    def mask_collapsed(self) -> bool:
        """`collapsed` for the current channel mask, from one forward pass without gradients on the last batch."""
        masks = self.read_layout.element_masks(self.keep, [n for n in self.theta0 if self.read_layout.dims.get(n)])
        masked = {n: self.theta0[n] * masks[n] if n in masks else self.theta0[n] for n in self.theta0}
        self.spread.record(functional_call(self.model, {**masked, **self.buffers}, (self._last_x,)))
        return self.collapsed()

    def remember_mask_(self) -> None:
        self._previous = self.keep.clone()

    @torch.no_grad()
    def restore_mask_(self) -> bool:
        """Back to the channels `remember_mask_` kept; False when none were."""
        if self._previous is None:
            return False
        self.keep.copy_(self._previous)
        return True

    # ---- selection
    @torch.no_grad()
    def ranking_scores(self) -> torch.Tensor:
        """`scores`, or with `per_group` each divided by the mean of its group's finite scores (channels pruned for
        good keep -inf; a group scoring 0 throughout stays 0)."""
        if not self.per_group:
            return self.scores
        finite = torch.isfinite(self.scores)
        n = len(self.groups)
        sums = self.scores.new_zeros(n).index_add_(0, self._group_of, torch.where(finite, self.scores, 0.0))
        counts = self.scores.new_zeros(n).index_add_(0, self._group_of, finite.float())
        means = (sums / counts.clamp_min(1.0)).clamp_min(torch.finfo(self.scores.dtype).tiny)
        return self.scores / means[self._group_of]

    @torch.no_grad()
    def keep_top(self, k: int) -> torch.Tensor:
        """keep ← whole blocks of `multiple` channels. In each group the channels, ranked by score (ties by the
        seeded priority of select.py, then index), are cut into consecutive blocks; every group keeps the blocks
        that hold its `min_keep` best channels, then the longest prefix of the other blocks' global ranking (by
        summed score, or by summed score per unit of cost under a weighted budget; ties by the block's best
        channel) whose kept prunable weights cost at most k: at least the asked fraction is removed, as with
        unstructured masks. With `multiple` 1 a block is a channel."""
        c, dev = self.scores.numel(), self.device
        scores = self.ranking_scores()
        order = self._by_priority[torch.sort(scores[self._by_priority], descending=True, stable=True).indices]
        by_group = torch.sort(self._group_of[order], stable=True).indices  # positions in `order`, best first per group
        ranked = order[by_group]  # channels, group by group, best first in each
        group = self._group_of[ranked]
        block_in_group = (torch.arange(c, device=dev) - self._group_start[group]) // self.multiple
        block = self._block_start[group] + block_in_group
        score = scores.new_zeros(self._n_blocks).index_add_(0, block, scores[ranked])
        first = torch.full((self._n_blocks,), c, device=dev).scatter_reduce_(0, block, by_group, "amin")
        by_first = torch.sort(first).indices
        reserved = torch.zeros(self._n_blocks, dtype=torch.bool, device=dev)
        reserved[block[block_in_group < self._min_blocks[group]]] = True

        def prefix(rank_by: torch.Tensor, fits: Callable[[torch.Tensor], bool]) -> torch.Tensor:
            """The reserved blocks and the longest prefix of the others ranked by `rank_by` that `fits`."""
            ranking = by_first[torch.sort(rank_by[by_first], descending=True, stable=True).indices]
            rest = ranking[reserved[ranking].logical_not()]
            position = torch.full((self._n_blocks,), -1, device=dev)  # reserved blocks: -1, always kept
            position[rest] = torch.arange(rest.numel(), device=dev)
            channel_position = torch.empty(c, dtype=torch.long, device=dev)
            channel_position[ranked] = position[block]
            lo, hi = 0, rest.numel()  # what is kept grows with the prefix: the last length that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(channel_position < mid):
                    lo = mid
                else:
                    hi = mid - 1
            return channel_position < lo

        def within_k(keep: torch.Tensor) -> bool:
            return self.layout.kept(keep) <= k

        if self._price is None:
            keep = prefix(score, within_k)
        else:
            price = self._price.new_zeros(self._n_blocks).index_add_(0, block, self._price[ranked])
            if self.weight_cap is None:
                keep = prefix(score / price.clamp_min(1.0), within_k)
            else:
                keep = self._two_budgets(prefix, score, price, block, ranked, k, gain=scores.clamp_min(0.0))
        self.keep.copy_(keep)
        self.kept_cost = self.layout.kept(self.keep)
        return self.keep

    # Mixes of the two prices tried by `_two_budgets`: from the weights' alone (0) to the weighted budget's alone (1).
    PRICE_MIXES = tuple(i / 10 for i in range(11))

    def _two_budgets(self, prefix, score, price, block, ranked, k: int, gain: torch.Tensor) -> torch.Tensor:
        """Within both k (the weighted budget) and `weight_cap` (weights): for each mix a of the two prices, each
        normalised by its budget (a Lagrangian price with one multiplier per budget, searched on a grid), the
        longest prefix of the blocks ranked by score per mixed price that fits both; the mix keeping the most `gain`
        (each channel's ranking score, pruned-for-good channels at 0) wins (ties: the earlier mix)."""
        cap = self.weight_cap
        weights = self._weight_price.new_zeros(self._n_blocks).index_add_(0, block, self._weight_price[ranked])

        def fits(keep: torch.Tensor) -> bool:
            return self.layout.kept(keep) <= k and self.layout.kept_weights(keep) <= cap

        best, best_score = None, -1.0
        for a in self.PRICE_MIXES:
            mixed = a * price / max(k, 1) + (1 - a) * weights / max(cap, 1)
            keep = prefix(score / mixed.clamp_min(1e-30), fits)
            kept_score = float(gain[keep].sum())
            if kept_score > best_score:
                best, best_score = keep, kept_score
        return best


# ---- the built-in channel methods (FORCE.md's definitions, one gate per channel)


@register_method("force", structure="channel", default_steps=20)
def channel_force(ctx: ChannelContext) -> None:
    """FORCE on channels: each step ranks ALL channels by their saliency at the current channel mask (dense
    θ0), so a channel pruned at an earlier step can come back when its saliency there beats a kept one's
    (its consumers' gradients score it, see `saliency`).

    With `ctx.on_collapse == "nested"`, the weight methods' guard (`collapse.guarded_force`): once a step finds the
    masked network no longer depending on its input, the channels go back to those before the last selection and
    every remaining step selects nested, as Iterative SNIP does; the final channels are checked the same way."""
    guarded_force(ctx, ctx.saliency, lambda k: ctx.kept_cost)


@register_method("iter_snip", structure="channel", default_steps=20)
def channel_iter_snip(ctx: ChannelContext) -> None:
    """Iterative SNIP on channels: only channels still kept compete; pruned ones never return (nested)."""
    for t, d, k in ctx.schedule():
        ctx.saliency()
        ctx.drop_pruned_()
        ctx.keep_top(k)
        ctx.report(t, ctx.steps, density=d, kept=ctx.kept_cost)


@register_method("snip", structure="channel", single_shot=True)
def channel_snip(ctx: ChannelContext) -> None:
    """SNIP on channels: one saliency at the all-kept mask."""
    ctx.saliency()
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.kept_cost)


@register_method("magnitude", structure="channel", single_shot=True, needs_data=False)
def channel_magnitude(ctx: ChannelContext) -> None:
    """The channels of largest mean |θ0|."""
    ctx.magnitude_()
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.kept_cost)


@register_method("random", structure="channel", single_shot=True, needs_data=False)
def channel_random(ctx: ChannelContext) -> None:
    """Channels in a seeded random order."""
    ctx.random_()
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.kept_cost)


class ChannelFloorError(ValueError):
    """The density is below what every group's `min_keep` channels, in whole blocks of `multiple`, keep
    (`reachable`: the largest reachable sparsity; None when nothing at all can be pruned in such blocks). A caller
    that exposes these arguments under other names words its own message from the fields (`weights`: the floor is
    the second budget's, `weight_density`'s)."""

    def __init__(self, message: str, *, multiple: int, reachable: float | None = None, sparsity: float = 0.0,
                 floor: int = 0, total: int = 0, weights: bool = False) -> None:
        super().__init__(message)
        self.multiple, self.reachable, self.sparsity, self.floor, self.total = multiple, reachable, sparsity, floor, \
            total
        self.weights = weights  # the second budget's (weight_density), not density's


def compute_channel_masks(
    model: nn.Module,
    batches: Iterable | None,
    groups: Sequence[ChannelGroup],
    *,
    method: str,
    density: float,
    params: Sequence[str] | None,
    steps: int | None = None,
    schedule: str = "exp",
    batches_per_step: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
    loss_fn: Callable | None = None,
    multiple: int = 1,
    costs: Mapping[str, int] | None = None,
    on_collapse: str = "nested",
    collapse_ratio: float = COLLAPSE_RATIO,
    weight_density: float | None = None,
    per_group: bool = False,
) -> ChannelMasks:
    """Channel masks at initialization for `model`: the most channels (by the rule of `keep_top`) whose kept
    prunable weights stay within k = round(density·N), N the weights of `params` (None: Conv/Linear weights).
    `costs`: what one weight of each of `params` costs (e.g. the MACs it performs per image, its layer's output
    positions); then N and k count that cost instead of weights, and channels are chosen as a knapsack.

    - `groups`: which slices of which parameters each group's channels cover; groups reaching none of
      `params` are kept whole (listed in meta["unprunable_groups"]).
    - `method`: a name from `available_methods(structure="channel")` (force, iter_snip, snip, magnitude,
      random, or one registered with `register_method(..., structure="channel")`).
    - `batches`: iterable of (inputs, targets), consumed as `compute_masks` does (fresh batches at every
      step); None or empty for the data-free methods (magnitude, random).
    - `steps`: None means the method's default (20 for force/iter_snip; single-shot methods take one).
    - `multiple`: channels are kept in blocks of this many per group (see `ChannelContext.keep_top`); a group of
      at most `multiple` channels is kept whole.
    - `on_collapse`, `collapse_ratio`: channel FORCE's guard against a masked network that no longer depends on
      its input, as `compute_masks`' (see `channel_force`).
    - `weight_density`: with `costs`, a second budget: the kept weights (counted, not costed) are also at most
      round(weight_density·N_w), on the same schedule; channels are then a knapsack with two constraints
      (`ChannelContext._two_budgets`).
    - `per_group`: channels are ranked by their score over their group's mean score (`ChannelContext.ranking_scores`)
      rather than by the score itself.

    The masks in `masks` cover `params` only: a caller that trains the masked network rather than cutting it
    also masks the biases and norm parameters of the pruned channels (`channel_element_masks`).
    The model comes back exactly as found. Raises ValueError when nothing is channel-prunable or the density
    is below what every group's `min_keep` channels keep (the message names the largest reachable sparsity).
    """
    started = time.perf_counter()
    check_run_args(density, schedule, steps, batches_per_step)
    check_collapse_args(on_collapse, collapse_ratio)
    spec = get_method(method, structure="channel")
    prunable = prunable_parameters(model, params=params)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    groups = list(groups)
    _check_groups(groups, shapes)
    cutting = [g for g in groups if any(s.param in prunable for s in g.slices)]
    if not cutting:
        raise ValueError(
            f"nothing is channel-prunable: {len(groups)} channel group(s), none with a slice of the "
            f"{len(prunable)} prunable weight tensors {list(prunable)[:3]}..."
        )
    device = next(iter(prunable.values())).device
    if costs is not None:
        bad = [n for n in prunable if not isinstance(costs.get(n), int) or isinstance(costs.get(n), bool)
               or costs[n] < 1]
        if bad:
            raise ValueError(f"costs must give every prunable parameter an integer cost >= 1; {bad[0]!r} has "
                             f"{costs.get(bad[0])!r}")
    layout = _Layout(shapes, cutting, list(prunable), device, costs)
    n_total = layout.total
    unit = "prunable weights" if costs is None else "cost units of the prunable weights"
    k = kept_count(density, n_total)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
    fewest = torch.cat([torch.arange(g.size, device=device) < -(-g.min_keep // multiple) * multiple for g in cutting])
    floor = layout.kept(fewest)
    if floor == n_total:
        raise ChannelFloorError(
            f"nothing is channel-prunable in blocks of {multiple} channels: no group has more than {multiple} "
            "(min_keep rounded up to whole blocks); use a smaller multiple", multiple=multiple)
    if floor > k:
        reachable = math.floor((1.0 - floor / n_total) * 1e4) / 1e4  # rounded down: that sparsity is reachable
        raise ChannelFloorError(
            f"sparsity {1 - density:.4g} keeps {k} of the {n_total} {unit}, but min_keep channels of every "
            f"group keep {floor}: the largest reachable sparsity is {reachable:.4f}; lower the sparsity, min_keep "
            "or multiple", multiple=multiple, reachable=reachable, sparsity=1 - density, floor=floor, total=n_total)
    if weight_density is not None:
        if costs is None:
            raise ValueError("weight_density is a second budget beside costs; without costs density counts weights")
        if isinstance(weight_density, bool) or not 0.0 < weight_density <= 1.0:
            raise ValueError(f"weight_density must be in (0, 1] (kept fraction of the weights), got {weight_density!r}")
        floor_weights, cap = layout.kept_weights(fewest), kept_count(weight_density, layout.total_weights)
        if floor_weights > cap:
            reachable = math.floor((1.0 - floor_weights / layout.total_weights) * 1e4) / 1e4
            raise ChannelFloorError(
                f"weight sparsity {1 - weight_density:.4g} keeps {cap} of the {layout.total_weights} prunable "
                f"weights, but min_keep channels of every group keep {floor_weights}: the largest reachable weight "
                f"sparsity is {reachable:.4f}; lower it, min_keep or multiple", multiple=multiple,
                reachable=reachable, sparsity=1 - weight_density, floor=floor_weights, total=layout.total_weights,
                weights=True)
    run_steps = 1 if spec.single_shot else (steps if steps is not None else spec.default_steps)
    if spec.needs_data and batches is None:
        raise ValueError(f"channel method {method!r} scores channels on data: pass batches")
    stream = BatchStream(batches, device) if spec.needs_data else None

    with training_mode(model):  # batch statistics, as the reference computes masks
        ctx = ChannelContext(
            model,
            layout,
            cutting,
            stream,
            density=density,
            steps=run_steps,
            schedule=schedule,
            loss_fn=loss_fn or F.cross_entropy,
            batches_per_step=batches_per_step,
            seed=seed,
            progress=progress,
            multiple=multiple,
            on_collapse=on_collapse,
            collapse_ratio=collapse_ratio,
            weight_density=weight_density,
            per_group=per_group,
        )
        spec.fn(ctx)

    flat = dict(zip([g.name for g in cutting], ctx.keep.split([g.size for g in cutting]), strict=True))
    keep = {g.name: flat[g.name].clone() if g.name in flat else torch.ones(g.size, dtype=torch.bool, device=device)
            for g in groups}  # fmt: skip
    kept_per = ctx.layout.kept_per_param(ctx.keep)
    meta: dict[str, Any] = {
        "method": method,
        "structure": "channel",
        "density": density,
        "target_density": density,
        "achieved_density": ctx.kept_cost / n_total,
        "k": k,
        "budget": "weights" if costs is None else "costs",
        "kept_cost": ctx.kept_cost,
        "total_cost": n_total,
        "kept_weights": int(kept_per.sum()),
        "weight_density": weight_density,
        "total_weights": layout.total_weights,
        "kept": dict(zip(layout.counted, kept_per.tolist(), strict=True)),
        "channels_kept": sum(int(torch.count_nonzero(v)) for v in keep.values()),
        "channels_total": sum(g.size for g in groups),
        "group_kept": {name: int(torch.count_nonzero(v)) for name, v in keep.items()},
        "group_sizes": {g.name: g.size for g in groups},
        "unprunable_groups": [g.name for g in groups if g.name not in flat],
        "steps": run_steps,
        "schedule": schedule,
        "batches_per_step": batches_per_step,
        "seed": seed,
        "multiple": multiple,
        "ranking": "per group" if per_group else "global",
        "on_collapse": on_collapse,
        "collapse_step": ctx.collapse_step,
        "step_losses": [round(v, 6) for v in ctx.losses],
        "seconds": round(time.perf_counter() - started, 3),
        "numerics": numerics(device),
    }
    masks = MaskSet(layout.element_masks(ctx.keep, layout.counted), meta)
    return ChannelMasks(keep=keep, masks=masks, meta=meta)


__all__ = [
    "ChannelContext",
    "ChannelGroup",
    "ChannelMasks",
    "ChannelSlice",
    "channel_element_masks",
    "compute_channel_masks",
]
