"""When a masked network no longer depends on its input: its outputs over a batch have stopped spreading. The loss
then sits at the uniform-prediction value, every gradient upstream of the cut is (nearly) zero and a selection
picks among ties. Shared by the weight methods (engine) and the channel methods (channels)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

COLLAPSE_RULES = ("nested", "none")
# A network whose outputs spread over a batch less than this fraction of the dense network's is nearly cut.
COLLAPSE_RATIO = 0.1


def check_collapse_args(on_collapse: str, collapse_ratio: float) -> None:
    if isinstance(collapse_ratio, bool) or not isinstance(collapse_ratio, (int, float)) or not 0 <= collapse_ratio < 1:
        raise ValueError(f"collapse_ratio must be in [0, 1), got {collapse_ratio!r}")
    if on_collapse not in COLLAPSE_RULES:
        raise ValueError(f"on_collapse must be one of {', '.join(COLLAPSE_RULES)}, got {on_collapse!r}")


class OutputSpread:
    """How far the outputs of a batch spread around their mean, per forward pass recorded; the first one (the dense
    network) is the reference, and the network counts as collapsed once the last spread is at most `ratio` of it."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.last: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None

    @torch.no_grad()
    def record(self, out) -> None:
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] > 1:
            out = out.detach().float()
            self.last = (out - out.mean(0, keepdim=True)).abs().amax()
            if self.dense is None:
                self.dense = self.last.clone()

    def collapsed(self) -> bool:
        if self.last is None or self.dense is None:
            return False
        return float(self.last) <= self.ratio * float(self.dense)


def guarded_force(ctx: Any, score: Callable[[], Any], kept: Callable[[int], int]) -> None:
    """FORCE's steps with the collapse guard, for weights (engine.PruningContext) and channels (ChannelContext) alike:
    each step scores every unit at the current mask (`score`) and keeps the top k, so a pruned unit can come back.

    With `ctx.on_collapse == "nested"`: once a step finds the masked network no longer depending on its input
    (`ctx.collapsed`), its saliencies are all ties at 0, so the mask goes back to the one before the last selection
    (whose saliencies were still informative) and every remaining step selects nested, as Iterative SNIP does; the
    final mask is checked the same way with one forward pass (`ctx.mask_collapsed`). `kept(k)`: what a step reports
    as kept (k itself, or what a weighted budget's selection costs)."""
    guard = ctx.on_collapse == "nested"
    nested = False
    for t, d, k in ctx.schedule():
        score()
        if guard and not nested and ctx.collapsed():
            nested, ctx.collapse_step = True, t
            if ctx.restore_mask_():
                score()
        if nested:
            ctx.drop_pruned_()
        elif guard:
            ctx.remember_mask_()
        ctx.keep_top(k)
        ctx.report(t, ctx.steps, density=d, kept=kept(k))
    if guard and not nested and ctx.mask_collapsed() and ctx.restore_mask_():
        ctx.collapse_step = ctx.steps + 1
        score()
        ctx.drop_pruned_()
        ctx.keep_top(ctx.k)
        ctx.report(ctx.steps, ctx.steps, density=ctx.density, kept=kept(ctx.k))
