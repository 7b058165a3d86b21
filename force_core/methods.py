"""The built-in pruning methods, one function and one `register_method` decorator each.

Definitions follow ../shared/FORCE.md (de Jorge et al., ICLR 2021, and its baselines). Imports torch only.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from force_core.collapse import guarded_force
from force_core.engine import PruningContext
from force_core.registry import register_method


@register_method("random", single_shot=True, needs_data=False)
def random(ctx: PruningContext) -> None:
    """k connections uniformly at random over all layers (seeded, so repeatable)."""
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    torch.rand(ctx.numel, generator=gen, device=ctx.device, out=ctx.scores)
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.k)


@register_method("magnitude", single_shot=True, needs_data=False)
def magnitude(ctx: PruningContext) -> None:
    """The k largest |θ0|."""
    with torch.no_grad():
        for s, t in zip(ctx.score_views, ctx.theta0, strict=True):
            torch.abs(t, out=s)
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.k)


@register_method("snip", single_shot=True)
def snip(ctx: PruningContext) -> None:
    """SNIP (Lee et al. 2019): one step at m = 1, keep the k largest |θ0 · ∂L/∂θ0|."""
    ctx.connection_sensitivity()
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.k)


@register_method("force", default_steps=20)
def force(ctx: PruningContext) -> None:
    """FORCE: each step ranks ALL connections by |θ0 · ∂L/∂(θ0⊙m)| at the current mask, with the
    dense θ0, so a pruned connection can come back; gradients of pruned weights are not blocked. The collapse
    guard (`ctx.on_collapse == "nested"`) is `collapse.guarded_force`'s."""
    guarded_force(ctx, ctx.connection_sensitivity, lambda k: k)


@register_method("iter_snip", default_steps=20)
def iter_snip(ctx: PruningContext) -> None:
    """Iterative SNIP: each step ranks only the connections still alive; pruned ones get the
    minimum score and never return (nested masks)."""
    for t, d, k in ctx.schedule():
        ctx.connection_sensitivity()
        ctx.drop_pruned_()
        ctx.keep_top(k)
        ctx.report(t, ctx.steps, density=d, kept=k)


@register_method("grasp", single_shot=True)
def grasp(ctx: PruningContext) -> None:
    """GraSP (Wang et al. 2020): score −θ0 ⊙ (H g), one Hessian-vector product; the highest scores
    are pruned, i.e. the k largest θ0 ⊙ (H g) are kept. (The GraSP code also divides the logits by a
    temperature of 200; FORCE.md's definition, used here, has none: pass a `loss_fn` that does.)"""
    ws = ctx.masked_weights
    batches = ctx.batches.take(ctx.batches_per_step)
    g = None
    for batch in batches:  # g: the gradient, no graph kept
        gb = torch.autograd.grad(ctx.loss(ws, batch), ws, allow_unused=True)
        gb = [torch.zeros_like(w) if x is None else x for x, w in zip(gb, ws, strict=True)]
        g = gb if g is None else torch._foreach_add(g, gb)
    hg = None
    for batch in batches:  # H g = ∂(gradᵀ g)/∂w
        grads = torch.autograd.grad(ctx.loss(ws, batch), ws, create_graph=True, allow_unused=True)
        z = sum((gr * gi).sum() for gr, gi in zip(grads, g, strict=True) if gr is not None)
        hb = torch.autograd.grad(z, ws, allow_unused=True)
        hb = [torch.zeros_like(w) if x is None else x for x, w in zip(hb, ws, strict=True)]
        hg = hb if hg is None else torch._foreach_add(hg, hb)
    with torch.no_grad():
        for s, t, h in zip(ctx.score_views, ctx.theta0, hg, strict=True):
            torch.mul(t, h, out=s)
    ctx.keep_top(ctx.k)
    ctx.report(1, 1, density=ctx.density, kept=ctx.k)


@register_method("synflow", default_steps=100, needs_data=False)  # data-free: only the input's shape is read
def synflow(ctx: PruningContext) -> None:
    """SynFlow (Tanaka et al. 2020), data-free: R = sum of the output of the network with |θ|
    weights (all parameters and buffers made positive) on one all-ones input; score |θ ⊙ ∂R/∂θ| at
    the current mask, pruned ones never return, exponential schedule (100 steps by default).

    As in the SynFlow code the model runs in eval mode (BatchNorm uses its running statistics and
    updates nothing). Deviation: float64 instead of float32, since R overflows float32 on deep
    networks at initialization. Only the input's shape is taken from the first batch.
    """
    model = ctx.model
    model.eval()
    prunable = set(ctx.names)
    fixed = {n: p.detach().abs().double() for n, p in model.named_parameters() if n not in prunable}
    fixed.update({n: b.detach().abs().double() if b.is_floating_point() else b for n, b in ctx.buffers.items()})
    theta_abs = [t.abs().double() for t in ctx.theta0]
    x = torch.ones((1, *ctx.batches.first[0].shape[1:]), dtype=torch.float64, device=ctx.device)
    for t, d, k in ctx.schedule():
        with torch.no_grad():
            ws = [(ta * m).requires_grad_(True) for ta, m in zip(theta_abs, ctx.mask_views, strict=True)]
        r = functional_call(model, {**fixed, **dict(zip(ctx.names, ws, strict=True))}, (x,)).sum()
        grads = torch.autograd.grad(r, ws, allow_unused=True)
        with torch.no_grad():
            for s, ta, g in zip(ctx.score_views, theta_abs, grads, strict=True):
                s.copy_(ta * g if g is not None else torch.zeros_like(ta))
            ctx.scores.abs_()
            ctx.drop_pruned_()
        ctx.keep_top(k)
        ctx.report(t, ctx.steps, density=d, kept=k)
