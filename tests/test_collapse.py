"""FORCE's collapse guard, the per-layer floor and fresh mask batches (issue 11)."""

from __future__ import annotations

import torch
import torch.nn as nn

import force_core
from force_core import compute_masks, register_method


def _chain(depth: int = 4, width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, c = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _batches(n: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@register_method("test_cut_first_layer", single_shot=True)
def _cut_first_layer(ctx) -> None:
    """Records what `collapsed` says at the dense network and once the first layer is emptied."""
    ctx.connection_sensitivity()
    seen = [ctx.collapsed()]
    ctx.remember_mask_()
    ctx.mask_views[0].fill_(False)
    ctx._stale = True
    ctx.connection_sensitivity()
    seen.append(ctx.collapsed())
    assert ctx.restore_mask_() and bool(ctx.mask.all())
    ctx.scores.fill_(1.0)
    ctx.keep_top(ctx.k)
    _cut_first_layer.seen = seen


def test_a_network_cut_at_its_first_layer_counts_as_collapsed_and_the_dense_one_does_not():
    compute_masks(_chain(), _batches(), method="test_cut_first_layer", density=0.5)
    assert _cut_first_layer.seen == [False, True]


def test_the_guard_leaves_a_healthy_schedule_bit_identical_to_the_papers_force():
    model, batches = _chain(), _batches()
    paper = compute_masks(model, batches, method="force", density=0.2, steps=5, on_collapse="none")
    guarded = compute_masks(model, batches, method="force", density=0.2, steps=5)
    assert guarded.meta["collapse_step"] is None
    assert all(torch.equal(paper[n], guarded[n]) for n in paper)
    assert guarded.meta["on_collapse"] == "nested" and len(guarded.meta["step_losses"]) == 5


def test_the_floor_keeps_every_layer_and_the_exact_count():
    model = _chain(depth=6)
    free = compute_masks(model, _batches(), method="snip", density=0.003)
    floored = compute_masks(model, _batches(), method="snip", density=0.003, min_per_layer=1)
    assert free.disconnected  # SNIP at this density empties layers (the paper's finding)
    assert not floored.disconnected
    assert floored.total_kept() == free.total_kept() == force_core.kept_count(0.003, free.total())


def test_iterative_methods_get_fresh_batches_at_every_step():
    from stages.compute_masks import mask_batch_count

    assert mask_batch_count("force", 20, 1) == 20
    assert mask_batch_count("iter_snip", None, 2) == 40  # the method's default of 20 steps
    assert mask_batch_count("snip", 20, 3) == 3
