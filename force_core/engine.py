"""`compute_masks` and the `PruningContext` that every registered method works through.

No copy of the network is ever made: the masked weights θ0⊙m are separate leaf tensors handed to
`torch.func.functional_call`, so one backward gives ∂L/∂(θ0⊙m) for every weight, pruned or not,
and the model's parameters, buffers (cloned for the call), gradients and modes stay as found.
Imports torch and the stdlib only.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from force_core.batches import BatchStream
from force_core.collapse import COLLAPSE_RATIO, OutputSpread, check_collapse_args
from force_core.maskset import MaskSet
from force_core.params import Selector, prunable_parameters
from force_core.progress import SCHEDULES, Progress, ScheduleMixin, density_schedule, kept_count
from force_core.registry import get_method
from force_core.select import TiePriority, keep_top_k_, sample_indices

_REFRESH_SLICE = 1 << 20  # entries per slice of the masked-weight refresh on CPU (4 MiB of float mask)


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` fills its numel() elements of storage without gaps or overlaps (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class PruningContext(ScheduleMixin):
    """What a method works with. Flat buffers hold one entry per prunable weight, in the order of
    `names` (each parameter row-major); `scores` and `mask` have per-parameter views.

    A method reads/writes `scores`, calls `keep_top(k)` (which updates `mask` and the masked
    weights), and reports each step with `report` (the steps of the density schedule: `schedule`, ScheduleMixin).
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        batches: BatchStream,
        *,
        density: float,
        steps: int,
        schedule: str,
        loss_fn: Callable,
        batches_per_step: int,
        min_per_layer: int,
        seed: int,
        progress: Progress | None,
        on_collapse: str = "nested",
        collapse_ratio: float = 0.1,
    ):
        self.model = model
        self.names = list(params)
        self.theta0 = [p.detach() for p in params.values()]  # the dense initial weights, never written
        self.batches = batches
        self.density, self.steps, self.schedule_kind = density, steps, schedule
        self.loss_fn, self.batches_per_step = loss_fn, batches_per_step
        self.min_per_layer, self.seed, self.progress = min_per_layer, seed, progress
        first = self.theta0[0]
        self.device = first.device
        self.numel = sum(t.numel() for t in self.theta0)
        self.k = kept_count(density, self.numel)
        # Flat buffers: scores (float32; also holds the 0/1 float mask right after a selection) and mask.
        self.scores = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.mask = torch.ones(self.numel, dtype=torch.bool, device=self.device)
        sizes = [t.numel() for t in self.theta0]
        self.score_views = [v.view_as(t) for v, t in zip(self.scores.split(sizes), self.theta0, strict=True)]
        self.mask_views = [v.view_as(t) for v, t in zip(self.mask.split(sizes), self.theta0, strict=True)]
        self._sample = sample_indices(self.numel, self.device, seed)
        self._priority = TiePriority(seed)  # the tie priority, regenerated when a tie needs it (select.py)
        self._ks = [k for _, _, k in self.schedule()]  # told to the priority: ties expected at later steps
        self._weights: list[torch.Tensor] | None = None
        self._flat_weights: torch.Tensor | None = None  # their storage, when they are views of one buffer
        self._stale = False
        # Buffers (BatchNorm running stats) are cloned once: training-mode forwards update the clones.
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}
        self.losses: list[float] = []
        self.on_collapse, self.collapse_ratio = on_collapse, collapse_ratio
        self.collapse_step: int | None = None  # the step whose saliencies found the network collapsed
        self.spread = OutputSpread(collapse_ratio)
        self._previous: torch.Tensor | None = None
        self._last_batch = batches.first

    # ---- masked weights and forward passes
    @property
    def masked_weights(self) -> list[torch.Tensor]:
        """Leaves θ0⊙m (requires_grad), one per prunable parameter, for the current mask.

        Refreshed lazily after `keep_top` (no work after the last step); a refresh uses the
        `scores` buffer for the 0/1 float mask, so read the masked weights before writing scores.
        `keep_top` uses their storage as scratch: do not keep them across a selection.
        """
        if self._weights is None:
            self._weights = self._new_weights()
            self._stale = not bool(self.mask.all())
        if self._stale:
            self._refresh_weights()
        return self._weights

    @torch.no_grad()
    def _new_weights(self) -> list[torch.Tensor]:
        """Leaves holding θ0, each with θ0's strides: views of one flat buffer when the θ0 share a dtype and
        are dense, so that `keep_top` can use that storage as scratch while they are stale."""
        dtype = self.theta0[0].dtype
        if not all(t.dtype == dtype and _dense(t) for t in self.theta0):
            return [t.clone().requires_grad_(True) for t in self.theta0]
        self._flat_weights = torch.empty(-(-self.numel // 8) * 8, dtype=dtype, device=self.device)
        ws, start = [], 0
        for t in self.theta0:
            ws.append(self._flat_weights.as_strided(t.shape, t.stride(), start).copy_(t).requires_grad_(True))
            start += t.numel()
        return ws

    def _scratch(self) -> list[torch.Tensor]:
        """Flat bool buffers of N entries in the storage of the masked weights, free while they are stale
        (from a selection to their next use): as many as it holds, for the selection's temporaries."""
        if self._flat_weights is None:
            return []
        n_pad = self._flat_weights.numel()
        u8 = self._flat_weights.view(torch.uint8)
        return [u8[i * n_pad : i * n_pad + self.numel].view(torch.bool) for i in range(u8.numel() // n_pad)]

    @torch.no_grad()
    def _refresh_weights(self) -> None:
        # θ0 times the float 0/1 mask (cheaper than times a bool mask), converted from the mask's bytes read
        # as uint8 (~3x cheaper on CPU than from bool; same values). On CPU slice by slice through the head of
        # `scores`, so that each slice of the float mask is still in cache when multiplied.
        u8 = self.mask.view(torch.uint8)
        if self.device.type != "cpu":
            self.scores.copy_(u8)
        start, c = 0, _REFRESH_SLICE
        for w, t, m in zip(self._weights, self.theta0, self.score_views, strict=True):
            n = t.numel()
            if self.device.type != "cpu":
                torch.mul(t, m, out=w)
            elif t.is_contiguous() and w.is_contiguous():
                tf, wf = t.view(-1), w.view(-1)
                for a in range(0, n, c):
                    f = self.scores[: min(c, n - a)]
                    f.copy_(u8[start + a : start + a + f.numel()])
                    torch.mul(tf[a : a + f.numel()], f, out=wf[a : a + f.numel()])
            else:
                torch.mul(t, m.copy_(u8[start : start + n].view_as(m)), out=w)
            start += n
        self._stale = False

    def loss(self, weights: Sequence[torch.Tensor], batch) -> torch.Tensor:
        """Training loss of the network whose prunable weights are `weights` (model's other params); keeps how
        much the outputs still depend on the inputs (see `collapsed`)."""
        x, y = batch
        self._last_batch = batch
        tensors = dict(zip(self.names, weights, strict=True))
        tensors.update(self.buffers)
        out = functional_call(self.model, tensors, (x,))
        self.spread.record(out)
        return self.loss_fn(out, y)

    # ---- collapse
    def collapsed(self) -> bool:
        """Whether the network at the current mask is (nearly) cut, judged by the last forward pass: the
        outputs' spread over the batch has fallen to `collapse_ratio` of the dense network's. The loss then sits
        at the uniform-prediction value, every gradient upstream of the cut is (nearly) zero and a selection
        picks among ties (issue 11: FORCE from ~2.5% density on a narrow VGG19, spread 4.4 at the dense
        network, 0.70, 0.08, then exactly 0 over its last steps). Zero saliencies alone are no sign: at 32×32
        most taps of an ImageNet network's last stage see only padding (FORCE.md)."""
        return self.spread.collapsed()

    @torch.no_grad()
    def mask_collapsed(self) -> bool:
        """`collapsed` for the current mask from one forward pass without gradients on the last batch used
        (after the last step: the batch stream and the loss function see nothing of it)."""
        tensors = dict(zip(self.names, self.masked_weights, strict=True))
        tensors.update(self.buffers)
        self.spread.record(functional_call(self.model, tensors, (self._last_batch[0],)))
        return self.collapsed()

    def gradients(self) -> list[torch.Tensor]:
        """∂L/∂(θ0⊙m), summed over the next `batches_per_step` batches, returned as views of `scores`.

        Backward accumulates each layer's gradient in place into the flat `scores` buffer (the
        weights' `.grad` are its views), so the full set of gradients never exists twice.
        """
        ws = self.masked_weights
        with torch.no_grad():
            self.scores.zero_()
        for w, g in zip(ws, self.score_views, strict=True):
            w.grad = g
        for batch in self.batches.take(self.batches_per_step):
            loss = self.loss(ws, batch)
            torch.autograd.backward(loss, inputs=ws)
            self.losses.append(float(loss.detach()))
        return self.score_views

    def connection_sensitivity(self) -> torch.Tensor:
        """scores ← |θ0 · ∂L/∂(θ0⊙m)| at the current mask, for every weight (FORCE.md, Saliency)."""
        if self.batches_per_step == 1:
            return self._sensitivity_one_batch()
        grads = self.gradients()
        with torch.no_grad():
            torch._foreach_mul_(grads, self.theta0)  # in place in `scores`, one call for all layers
            return self.scores.abs_()

    def _sensitivity_one_batch(self) -> torch.Tensor:
        """`connection_sensitivity` for one batch per step, in fewer passes over N: each layer's
        gradient, as backward produces it, is multiplied by θ0 straight into `scores`, made absolute
        while still in cache, and freed (no zeroing, no accumulation pass, no separate pass for |·|).
        Same bits: |g·θ0| with g the one batch's gradient."""
        ws = self.masked_weights  # before writing scores (a refresh uses them)
        done = [False] * len(ws)

        @torch.no_grad()
        def store(w: torch.Tensor, i: int) -> None:
            torch.mul(w.grad, self.theta0[i], out=self.score_views[i]).abs_()
            w.grad = None
            done[i] = True

        for w in ws:
            w.grad = None
        handles = [w.register_post_accumulate_grad_hook(partial(store, i=i)) for i, w in enumerate(ws)]
        try:
            (batch,) = self.batches.take(1)
            loss = self.loss(ws, batch)
            torch.autograd.backward(loss, inputs=ws)
        finally:
            for h in handles:
                h.remove()
        self.losses.append(float(loss.detach()))
        with torch.no_grad():
            for i, ok in enumerate(done):
                if not ok:  # no gradient reached this layer: zero, as `gradients` gives
                    self.score_views[i].zero_()
        return self.scores

    @torch.no_grad()
    def remember_mask_(self) -> None:
        """Keep a copy of the current mask (one bool per weight) for `restore_mask_`."""
        if self._previous is None:
            self._previous = torch.empty_like(self.mask)
        self._previous.copy_(self.mask)

    @torch.no_grad()
    def restore_mask_(self) -> bool:
        """Go back to the mask kept by `remember_mask_`; False when there is none."""
        if self._previous is None:
            return False
        self.mask.copy_(self._previous)
        self._stale = True
        return True

    @torch.no_grad()
    def drop_pruned_(self) -> None:
        """Give pruned connections the minimum score: they can never come back (nested masks)."""
        self.scores.masked_fill_(self.mask.logical_not(), -math.inf)

    # ---- selection
    @torch.no_grad()
    def keep_top(self, k: int) -> torch.Tensor:
        """mask ← exactly the k highest scores (ties: the seeded tie priority, see select.py); θ0⊙m
        follows on next use. Consumes `scores`: when a tie is broken the buffer is overwritten."""
        if self.min_per_layer:
            self._reserve_per_layer()
        # The tie priority (select.py) is regenerated when a tie needs it, into the scores buffer,
        # which the selection consumes: no N-sized float priority is kept between selections (see
        # TiePriority.plan for the ties expected at later steps of the schedule). Its other
        # temporaries live in the masked weights' storage, stale from here to their next use.
        self._stale = True
        self._priority.plan(k, [later for later in self._ks if later < k])
        keep_top_k_(self.scores, k, self.mask, self._sample, self._priority, work=self.scores, scratch=self._scratch())
        return self.mask

    def _reserve_per_layer(self) -> None:
        # Opt-in guard: each layer's best `min_per_layer` scores are set to +inf, so the global
        # selection keeps them and fills the rest of k as usual.
        for s in self.score_views:
            flat = s.view(-1)
            m = min(self.min_per_layer, flat.numel())
            flat.index_fill_(0, torch.topk(flat, m, sorted=False).indices, math.inf)


def compute_masks(
    model: nn.Module,
    batches: Iterable,
    *,
    method: str,
    density: float,
    steps: int | None = None,
    schedule: str = "exp",
    loss_fn: Callable = F.cross_entropy,
    batches_per_step: int = 1,
    params: Iterable[str] | None = None,
    selector: Selector | None = None,
    min_per_layer: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
    on_collapse: str = "nested",
    collapse_ratio: float = COLLAPSE_RATIO,
) -> MaskSet:
    """Pruning masks at initialization for `model`, keeping exactly round(density·N) weights.

    - `batches`: iterable of (inputs, targets); each step consumes the next `batches_per_step`,
      cycling (a list of one batch means that batch at every step).
    - `method`: a name from `available_methods()` (force, iter_snip, snip, grasp, synflow,
      magnitude, random, or one registered with `register_method`).
    - `steps`: None means the method's default (20 for force/iter_snip, 100 for synflow; single-shot
      methods always take one step).
    - `params` / `selector`: which parameters are prunable (see `prunable_parameters`).
    - `min_per_layer`: opt-in guard keeping at least this many weights in every layer (0: the paper).
    - `progress(step, total, info)` is called after every step.
    - `on_collapse`: what FORCE does when the masked network stops depending on its input (see
      `PruningContext.collapsed`): "nested" goes back to the last mask that did not, and continues with
      Iterative SNIP's nested selection; "none" carries on as the paper's FORCE does. Other methods ignore it.
      `collapse_ratio`: the network counts as collapsed when its outputs spread over a batch at most this
      fraction of the dense network's (0: only when they no longer depend on the input at all).

    The model comes back exactly as found: parameters, buffers, gradients and train/eval modes.
    Masks are on the model's device; equal inputs on equal numerics give identical masks.
    """
    check_run_args(density, schedule, steps, batches_per_step)
    spec = get_method(method)
    check_collapse_args(on_collapse, collapse_ratio)
    if not isinstance(min_per_layer, int) or min_per_layer < 0:
        raise ValueError(f"min_per_layer must be an integer >= 0, got {min_per_layer!r}")

    prunable = prunable_parameters(model, params=params, selector=selector)
    if not prunable:
        raise ValueError(
            f"model {type(model).__name__} has no prunable layer (Conv*/ConvTranspose*/Linear weights, "
            "or the names given in params, filtered by selector)"
        )
    n_total = sum(p.numel() for p in prunable.values())
    k = kept_count(density, n_total)
    if k == 0:
        raise ValueError(f"density {density} keeps no weight of {n_total}; use a density >= {0.5 / n_total:.3g}")
    if min_per_layer * len(prunable) > k:
        raise ValueError(
            f"min_per_layer={min_per_layer} needs {min_per_layer * len(prunable)} weights, more than the "
            f"{k} kept at density {density}; use min_per_layer <= {k // len(prunable)}"
        )
    run_steps = 1 if spec.single_shot else (steps if steps is not None else spec.default_steps)
    device = next(iter(prunable.values())).device
    stream = BatchStream(batches, device)

    started = time.perf_counter()
    with training_mode(model):  # batch statistics, as the reference computes masks
        ctx = PruningContext(
            model,
            prunable,
            stream,
            density=density,
            steps=run_steps,
            schedule=schedule,
            loss_fn=loss_fn,
            batches_per_step=batches_per_step,
            min_per_layer=min_per_layer,
            seed=seed,
            progress=progress,
            on_collapse=on_collapse,
            collapse_ratio=collapse_ratio,
        )
        spec.fn(ctx)
    masks = dict(zip(ctx.names, ctx.mask_views, strict=True))
    meta = {
        "method": method,
        "density": density,
        "steps": run_steps,
        "schedule": schedule,
        "batches_per_step": batches_per_step,
        "seed": seed,
        "min_per_layer": min_per_layer,
        "on_collapse": on_collapse,
        "collapse_ratio": collapse_ratio,
        "collapse_step": ctx.collapse_step,
        "step_losses": [round(v, 6) for v in ctx.losses],
        "k": k,
        "total": n_total,
        "seconds": round(time.perf_counter() - started, 3),
        "numerics": numerics(device),
    }
    return MaskSet(masks, meta)


def check_run_args(density, schedule: str, steps, batches_per_step) -> None:
    """The arguments every mask computation shares, checked with one ValueError each."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (kept fraction), got {density!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(batches_per_step, int) or batches_per_step < 1:
        raise ValueError(f"batches_per_step must be an integer >= 1, got {batches_per_step!r}")


@contextlib.contextmanager
def training_mode(model: nn.Module):
    """The model in train mode for the block, every module's own mode restored after it, whatever happens."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        yield model
    finally:
        for m, training in modes:
            m.training = training


def numerics(device) -> dict:
    """Multi-step masks are bit-identical only under identical numerics (FORCE.md): what the sidecar records."""
    return {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


__all__ = ["PruningContext", "compute_masks", "density_schedule", "kept_count"]
