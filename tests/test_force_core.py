"""force_core: masks at initialization (issue 2, Part 2). Tiny real models, CPU, seconds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import force_core
from force_core import MaskEnforcer, MaskSet, compute_masks, density_schedule, kept_count
from force_core.methods import force as force_method
from force_core.methods import iter_snip as iter_snip_method
from force_core.select import TiePriority, _count, _flatnonzero, keep_top_k_, sample_indices, tie_priority

METHODS = ["random", "magnitude", "snip", "iter_snip", "force", "grasp", "synflow"]


def small_cnn(seed: int = 0, width: int = 32) -> nn.Module:
    """Conv-BN-ReLU x4 + Linear at 16x16, 245,600 prunable weights (above the exact-sort cut-off of select.py)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4 * width, 4 * width, 3, padding=1),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width * 4, 10),
    )
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return m


def batch(seed: int = 0, n: int = 16, hw: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, 10, (n,), generator=g)


def recording(method_fn):
    """A user method (through the registry) that runs a built-in one and records every step's mask."""
    record: list[torch.Tensor] = []

    def run(ctx):
        keep_top = ctx.keep_top

        def keep_and_record(k):
            out = keep_top(k)
            record.append(ctx.mask.clone())
            return out

        ctx.keep_top = keep_and_record
        method_fn(ctx)

    return run, record


# ---------------------------------------------------------------- plain deep-copy reference


def stable_order(scores: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """All indices by score descending, ties by priority descending, then lowest index (full sorts)."""
    by_pri = torch.sort(priority, descending=True, stable=True).indices
    return by_pri[torch.sort(scores[by_pri], descending=True, stable=True).indices]


def plain_masks(model, x, y, *, density, steps, nested):
    """The published code's way, written plainly: deep-copy the network every step, write each
    prunable weight as θ0 * c with c the mask, backprop, score |∂L/∂c|, full stable sort by
    (score, tie priority, lowest index): the tie rule of select.py, priority drawn from seed 0."""
    layers = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    theta0 = {n: model.get_submodule(n).weight.detach().clone() for n in layers}
    mask = {n: torch.ones_like(theta0[n], dtype=torch.bool) for n in layers}
    total = sum(t.numel() for t in theta0.values())
    priority = tie_priority(total, "cpu", seed=0)
    for t in range(1, steps + 1):
        d = density if t == steps else density ** (t / steps)
        k = math.floor(d * total + 0.5)
        net = copy.deepcopy(model).train()
        cs = {}
        for n in layers:
            mod = net.get_submodule(n)
            c = mask[n].float().requires_grad_(True)
            del mod.weight
            mod.weight = theta0[n] * c
            cs[n] = c
        F.cross_entropy(net(x), y).backward()
        scores = torch.cat([cs[n].grad.abs().flatten() for n in layers])
        if nested:
            scores[~torch.cat([mask[n].flatten() for n in layers])] = -math.inf
        keep = torch.zeros(total, dtype=torch.bool)
        keep[stable_order(scores, priority)[:k]] = True
        parts = keep.split([theta0[n].numel() for n in layers])
        mask = {n: v.view_as(theta0[n]) for n, v in zip(layers, parts, strict=True)}
    return {f"{n}.weight": m for n, m in mask.items()}


@pytest.mark.parametrize("method,steps,nested", [("snip", 1, False), ("force", 4, False), ("iter_snip", 4, True)])
def test_masks_identical_to_plain_deepcopy_implementation(method, steps, nested):
    # Same float operations in the same process: multi-step masks must match bit for bit (FORCE.md).
    model = small_cnn()
    x, y = batch()
    ours = compute_masks(model, [(x, y)], method=method, density=0.02, steps=steps)
    ref = plain_masks(model, x, y, density=0.02, steps=steps, nested=nested)
    assert list(ours) == list(ref)
    for n in ref:
        assert torch.equal(ours[n], ref[n]), n


def test_one_step_force_is_snip():
    model = small_cnn()
    b = [batch()]
    a = compute_masks(model, b, method="force", density=0.05, steps=1)
    s = compute_masks(model, b, method="snip", density=0.05)
    assert all(torch.equal(a[n], s[n]) for n in a)


# ---------------------------------------------------------------- semantics


def test_schedules_match_their_formulas():
    d, T = 0.01, 20
    exp = density_schedule(d, T, "exp")
    lin = density_schedule(d, T, "linear")
    for t in range(1, T + 1):
        assert exp[t - 1] == pytest.approx(d ** (t / T), rel=1e-12)
        assert lin[t - 1] == pytest.approx(1 - (1 - d) * t / T, rel=1e-12)
    assert exp[-1] == d and lin[-1] == d
    assert all(a > b for a, b in zip(exp, exp[1:], strict=False))
    assert kept_count(0.5, 3) == 2 and kept_count(0.01, 1000) == 10


@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_progressive_steps_follow_the_schedule(schedule):
    seen = []
    compute_masks(
        small_cnn(),
        [batch()],
        method="force",
        density=0.05,
        steps=5,
        schedule=schedule,
        progress=lambda step, total, info: seen.append((step, total, info["kept"], info["density"])),
    )
    n = 3 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9 + 128 * 4 * 10
    expected = density_schedule(0.05, 5, schedule)
    assert [s[:2] for s in seen] == [(t, 5) for t in range(1, 6)]
    assert [s[2] for s in seen] == [kept_count(d, n) for d in expected]
    assert [s[3] for s in seen] == expected


@pytest.mark.parametrize("method", METHODS)
def test_exact_kept_count_and_shapes(method):
    model = small_cnn()
    masks = compute_masks(model, [batch()], method=method, density=0.013, steps=3)
    params = dict(model.named_parameters())
    assert list(masks) == ["0.weight", "3.weight", "7.weight", "11.weight", "16.weight"]  # conv/linear weights only
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == params[n].shape
    assert masks.total() == sum(params[n].numel() for n in masks)
    assert masks.total_kept() == round(0.013 * masks.total())
    assert masks.meta["method"] == method


def test_iter_snip_masks_are_nested():
    run, record = recording(iter_snip_method)
    force_core.register_method("test_iter_snip_recorded", default_steps=6)(run)
    compute_masks(small_cnn(), [batch()], method="test_iter_snip_recorded", density=0.01)
    assert len(record) == 6
    for before, after in zip(record, record[1:], strict=False):
        assert not (after & ~before).any()  # nothing comes back
        assert torch.count_nonzero(after) < torch.count_nonzero(before)


def test_force_brings_pruned_weights_back():
    # A pruned connection whose sensitivity at the sparser network becomes high is kept again:
    # FORCE ranks every weight with the dense θ0 and does not block gradients of pruned ones.
    run, record = recording(force_method)
    force_core.register_method("test_force_recorded", default_steps=6)(run)
    compute_masks(small_cnn(), [batch()], method="test_force_recorded", density=0.01)
    resurrected = [int(torch.count_nonzero(after & ~before)) for before, after in zip(record, record[1:], strict=False)]
    assert sum(resurrected) > 0, resurrected  # (iter_snip never does: test_iter_snip_masks_are_nested)


def test_model_state_untouched():
    model = small_cnn()
    x, y = batch()
    # Non-default state everywhere: running stats, gradients, a mix of train and eval modes.
    model.train()
    model(x)
    F.cross_entropy(model(x), y).backward()
    model.eval()
    model[1].train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    for method in METHODS:
        compute_masks(model, [(x, y)], method=method, density=0.05, steps=2)
        assert all(torch.equal(p, params[n]) for n, p in model.named_parameters()), method
        assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters()), method
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()), method
        assert [m.training for m in model.modules()] == modes, method


def test_same_inputs_give_same_masks():
    b = [batch(1)]
    model = small_cnn(3)
    for method in ["force", "random"]:
        a = compute_masks(model, b, method=method, density=0.02, steps=3, seed=7)
        c = compute_masks(copy.deepcopy(model), b, method=method, density=0.02, steps=3, seed=7)
        assert all(torch.equal(a[n], c[n]) for n in a), method
    r1 = compute_masks(model, b, method="random", density=0.02, seed=1)
    assert any(not torch.equal(a[n], r1[n]) for n in a)


def test_batches_cycle_batches_per_step_at_a_time():
    seen = []

    def loss(out, target):
        seen.append(int(target[0]))
        return F.cross_entropy(out, target)

    batches = [(torch.randn(4, 3, 16, 16), torch.full((4,), i)) for i in range(3)]
    compute_masks(small_cnn(), batches, method="force", density=0.1, steps=4, batches_per_step=2, loss_fn=loss)
    assert seen == [0, 1, 2, 0, 1, 2, 0, 1]
    seen.clear()  # a one-shot generator cycles too
    compute_masks(small_cnn(), iter(batches[:2]), method="iter_snip", density=0.1, steps=3, loss_fn=loss)
    assert seen == [0, 1, 0]


def test_magnitude_keeps_largest_and_random_is_uniform():
    model = small_cnn()
    masks = compute_masks(model, [batch()], method="magnitude", density=0.1)
    params = dict(model.named_parameters())
    kept = torch.cat([params[n].detach().abs()[m] for n, m in masks.items()])
    dropped = torch.cat([params[n].detach().abs()[~m] for n, m in masks.items()])
    assert kept.min() >= dropped.max()
    rnd = compute_masks(model, [batch()], method="random", density=0.1)
    for d in rnd.layer_density().values():
        assert 0.06 < d < 0.14


def test_grasp_prunes_highest_minus_theta_hg():
    model = small_cnn()
    x, y = batch()
    masks = compute_masks(model, [(x, y)], method="grasp", density=0.1)
    names = list(masks)
    ws = [dict(model.named_parameters())[n] for n in names]
    g = torch.autograd.grad(F.cross_entropy(model.train()(x), y), ws)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), ws, create_graph=True)
    hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g, strict=True)), ws)
    score = torch.cat([(-w.detach() * h).flatten() for w, h in zip(ws, hg, strict=True)])  # GraSP's score
    kept = torch.cat([masks[n].flatten() for n in names])
    # the pruned ones have the highest scores (allow float noise from a different evaluation order)
    assert score[kept].max() <= score[~kept].min() + 1e-6 * score.abs().max()


def test_synflow_is_data_free():
    model = small_cnn()
    x, y = batch()
    a = compute_masks(model, [(x, y)], method="synflow", density=0.05, steps=5)
    b = compute_masks(model, [(x * 0 + 3, y.flip(0))], method="synflow", density=0.05, steps=5)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert a.meta["steps"] == 5
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    assert compute_masks(tiny, [(x, y)], method="synflow", density=0.5).meta["steps"] == 100  # paper's default


# ---------------------------------------------------------------- the paper's phenomenon


VGG_CFG = [8, "M", 16, "M", 32, 32, "M", 64, 64, 64, 64]  # VGG-11's shape at 1/8 of its width


def vgg_like(cfg=VGG_CFG) -> nn.Module:
    """Deep, narrow VGG-style network (conv-BN-ReLU, no bias), Kaiming-normal init as in the paper."""
    layers, c = [], 1
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
        c = v
    m = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return m


def digits_batch(n: int = 128, hw: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images (sklearn's bundled 8x8 digits, upsampled): saliency needs a real task."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8)
    x = F.interpolate((x - x.mean()) / x.std(), size=(hw, hw), mode="bilinear", align_corners=False)
    idx = torch.randperm(len(x))[:n]
    return x[idx], torch.tensor(d.target)[idx]


def test_snip_disconnects_deep_vgg_at_99_5_percent():
    # The paper's phenomenon (de Jorge et al. 2021, Fig. 2-3): at 99.5% sparsity one-shot SNIP
    # empties whole layers, while the progressive FORCE and Iterative SNIP keep every layer.
    torch.manual_seed(1)
    model, b = vgg_like(), [digits_batch()]
    snip = compute_masks(model, b, method="snip", density=0.005)
    force = compute_masks(model, b, method="force", density=0.005, steps=20)
    iter_snip = compute_masks(model, b, method="iter_snip", density=0.005, steps=20)
    assert snip.disconnected, snip.kept()
    assert force.disconnected == [], force.kept()
    assert iter_snip.disconnected == [], iter_snip.kept()
    guarded = compute_masks(model, b, method="snip", density=0.005, min_per_layer=8)  # the opt-in guard
    assert guarded.disconnected == [] and guarded.total_kept() == snip.total_kept()


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("kind", ["distinct", "zeros", "few_values", "dead", "zeros_over_chunks", "all_zero"])
def test_exact_selection_matches_stable_sort_on_large_inputs(kind):
    # Reference: full stable sorts by (score, tie priority, index); ties at the k-th score spread by the priority.
    g = torch.Generator().manual_seed(len(kind))
    n = 2_500_000 if kind == "zeros_over_chunks" else 300_000  # ties spanning several scan chunks
    s = torch.rand(n, generator=g)
    if kind.startswith("zeros"):
        s[torch.rand(n, generator=g) < 0.6] = 0
    elif kind == "few_values":
        s = torch.randint(0, 4, (n,), generator=g).float()
    elif kind == "dead":
        s[torch.rand(n, generator=g) < 0.3] = -math.inf
    elif kind == "all_zero":
        s = torch.zeros(n)
    sample, priority = sample_indices(n, "cpu"), tie_priority(n, "cpu", seed=3)
    priority[::7] = 0.5  # equal priorities too: the lowest index decides among those
    out = torch.empty(n, dtype=torch.bool)
    order = stable_order(s, priority)
    ks = [n // 2, int(0.7 * n)] if kind == "zeros_over_chunks" else [1, 9, 3000, 90_000, 150_000, 240_000, n - 1]
    for k in ks:
        keep_top_k_(s, k, out, sample, priority)
        ref = torch.zeros(n, dtype=torch.bool)
        ref[order[:k]] = True
        assert torch.equal(out, ref), (kind, k)
    keep_top_k_(s, 3000, out, sample)  # no priority: lowest index, as one stable sort
    ref = torch.zeros(n, dtype=torch.bool)
    ref[torch.sort(s, descending=True, stable=True).indices[:3000]] = True
    assert torch.equal(out, ref), kind


@pytest.mark.parametrize("kind", ["zeros", "few_values", "all_zero"])
def test_regenerated_tie_priority_selects_as_the_stored_one(kind):
    # The engine's priority is regenerated (whole prefix, or the few chunks holding a handful of tied entries),
    # never stored: the same selection, bit for bit, as the stored stream and as full stable sorts.
    g = torch.Generator().manual_seed(11)
    n = 700_001
    s = torch.rand(n, generator=g)
    if kind == "zeros":
        s[torch.rand(n, generator=g) < 0.6] = 0
    elif kind == "few_values":
        s = torch.randint(0, 40, (n,), generator=g).float()
    else:
        s = torch.zeros(n)
    stored, regenerated, sample = tie_priority(n, "cpu", seed=3), TiePriority(3), sample_indices(n, "cpu")
    order = stable_order(s, stored)
    a, b = torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.bool)
    for k in [1, 4000, 350_000, 600_000, n - 1]:
        keep_top_k_(s, k, a, sample, stored)
        keep_top_k_(s.clone(), k, b, sample, regenerated, work=torch.empty(n))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[order[:k]] = True
        assert torch.equal(a, ref) and torch.equal(b, ref), (kind, k)


def test_ties_expected_by_the_schedule_need_no_regeneration_and_stay_exact():
    # Ties on the same exact zeros at several steps of a schedule: after the first, the planned TiePriority
    # answers them from what it kept, without regenerating the stream, bit for bit as the stored stream.
    g = torch.Generator().manual_seed(5)
    n = 600_000
    s = torch.rand(n, generator=g)
    s[torch.rand(n, generator=g) < 0.6] = 0  # about 240,000 non-zero scores: ties at 0 for the first four k
    ks = [500_000, 400_000, 330_000, 250_000, 100_000]
    stored, planned, sample = tie_priority(n, "cpu", seed=1), TiePriority(1), sample_indices(n, "cpu")
    regenerated = []
    fill = planned._fill
    planned._fill = lambda buf, start: (regenerated.append(buf.numel()), fill(buf, start))[1]
    a, b = torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.bool)
    for i, k in enumerate(ks):
        planned.plan(k, ks[i + 1 :])
        keep_top_k_(s, k, a, sample, stored)
        keep_top_k_(s.clone(), k, b, sample, planned, work=torch.empty(n))
        assert torch.equal(a, b), k
    assert regenerated == [n]  # the first tie only
    s2 = s.clone()
    s2[torch.rand(n, generator=g) < 0.3] = 0  # the ties have moved: what was kept cannot answer, still exact
    for i, k in enumerate(ks):
        planned.plan(k, ks[i + 1 :])
        keep_top_k_(s if i == 0 else s2, k, a, sample, stored)
        keep_top_k_((s if i == 0 else s2).clone(), k, b, sample, planned, work=torch.empty(n))
        assert torch.equal(a, b), k


def test_tie_priority_regenerated_by_chunks_is_the_stream():
    n = 3 * 65536 + 123
    ref, p = tie_priority(n, "cpu", seed=2), TiePriority(2)
    idx = torch.tensor([5, 70_000, 70_001, 150_000, n - 1])
    assert torch.equal(p.at(idx), ref[idx])  # walks the stream up to the last chunk
    assert torch.equal(p(torch.empty(n)), ref)
    assert torch.equal(p.at(idx[:3]), ref[idx[:3]]) and p.at(idx[:0]).numel() == 0
    assert torch.equal(p(torch.empty(1000)), ref[:1000])
    assert torch.equal(p(torch.empty(n, dtype=torch.float64)), ref.double())


@pytest.mark.parametrize("n,offset", [(11, 0), (3 * 2040 + 17, 0), (100_003, 0), (100_003, 3)])
def test_word_level_count_and_nonzero_match_torch(n, offset):
    g = torch.Generator().manual_seed(n + offset)
    for density in [0.0, 0.002, 0.05, 0.5, 1.0]:
        b = (torch.rand(n + offset, generator=g) < density)[offset:]
        assert _count(b) == int(torch.count_nonzero(b)), density
        assert torch.equal(_flatnonzero(b), b.nonzero().squeeze(1)), density


def test_masked_weights_follow_each_selection_in_the_layout_of_theta0():
    # A selection borrows the masked weights' storage for its temporaries; their next use gives θ0⊙m again,
    # with θ0's strides (a channels_last model stays channels_last).
    model = small_cnn().to(memory_format=torch.channels_last)
    seen = []

    def check(ctx):
        for _, _, k in ctx.schedule():
            ctx.connection_sensitivity()
            ctx.keep_top(k)
            pairs = zip(ctx.masked_weights, ctx.theta0, ctx.mask_views, strict=True)
            seen.append(all(torch.equal(w, t * m) and w.stride() == t.stride() for w, t, m in pairs))

    force_core.register_method("test_refresh_after_selection", default_steps=3)(check)
    compute_masks(model, [batch()], method="test_refresh_after_selection", density=0.05)
    assert seen == [True] * 3


def test_ties_spread_over_layers_not_to_the_first():
    # All scores exactly 0 (a network cut by an emptied layer): the kept weights are a seeded
    # uniform draw over all layers, identical for the same seed, not the first k by index.
    model = small_cnn()

    def zero_scores(ctx):
        ctx.scores.zero_()
        ctx.keep_top(ctx.k)

    force_core.register_method("test_all_ties", single_shot=True, needs_data=False)(zero_scores)
    a = compute_masks(model, [batch()], method="test_all_ties", density=0.01, seed=5)
    b = compute_masks(model, [batch()], method="test_all_ties", density=0.01, seed=5)
    c = compute_masks(model, [batch()], method="test_all_ties", density=0.01, seed=6)
    assert a.total_kept() == kept_count(0.01, a.total()) and a.disconnected == []
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    for n, d in a.layer_density().items():
        assert 0.003 < d < 0.03, (n, d)


def test_min_per_layer_guard_keeps_every_layer_and_exact_k():
    model = small_cnn()
    masks = compute_masks(model, [batch()], method="magnitude", density=0.002, min_per_layer=50)
    assert all(k >= 50 for k in masks.kept().values())
    assert masks.total_kept() == round(0.002 * masks.total())


# ---------------------------------------------------------------- MaskSet and training helpers


def test_maskset_figures_apply_save_load(tmp_path):
    model = small_cnn()
    masks = compute_masks(model, [batch()], method="snip", density=0.1)
    assert masks.density() == pytest.approx(0.1, abs=1e-5)
    assert masks.disconnected == []
    assert set(masks.layer_density()) == set(masks)
    path = masks.save(tmp_path / "masks.npz")
    assert (tmp_path / "masks.json").exists()
    loaded = MaskSet.load(path)
    assert list(loaded) == list(masks) and loaded.meta["method"] == "snip"
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    masks.apply(model)
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() and (params[n][m] != 0).all() for n, m in masks.items())
    empty = MaskSet({"a": torch.zeros(3, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)})
    assert empty.disconnected == ["a"] and empty.kept() == {"a": 0, "b": 2}


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mask_enforcer_keeps_pruned_weights_and_state_at_zero(opt):
    model = small_cnn()
    x, y = batch()
    masks = compute_masks(model, [(x, y)], method="random", density=0.2)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    enforcer = MaskEnforcer(model, masks)
    enforcer.apply_()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        enforcer.after_step(optimizer)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert (params[n][~m] == 0).all()
        for s in optimizer.state[params[n]].values():
            if isinstance(s, torch.Tensor) and s.shape == m.shape:
                assert (s[~m] == 0).all()
    hooked = MaskEnforcer(model, masks, grad_hook=True)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all((params[n].grad[~m] == 0).all() for n, m in masks.items())
    hooked.remove()


def test_prunable_parameters_default_explicit_and_selector():
    model = small_cnn()
    assert list(force_core.prunable_parameters(model)) == ["0.weight", "3.weight", "7.weight", "11.weight", "16.weight"]
    assert list(force_core.prunable_parameters(model, params=["16.weight", "0.bias"])) == ["0.bias", "16.weight"]
    assert list(force_core.prunable_parameters(model, selector={"exclude": ["0.*", "16.*"]})) == [
        "3.weight",
        "7.weight",
        "11.weight",
    ]
    only_conv = force_core.prunable_parameters(model, selector=lambda name, mod, p: isinstance(mod, nn.Conv2d))
    assert list(only_conv) == ["0.weight", "3.weight", "7.weight", "11.weight"]
    masks = compute_masks(model, [batch()], method="snip", density=0.1, params=["3.weight", "16.weight"])
    assert list(masks) == ["3.weight", "16.weight"]


def test_registry_lists_builtins_and_rejects_duplicates():
    assert set(METHODS) <= set(force_core.available_methods())
    with pytest.raises(ValueError, match="already registered"):
        force_core.register_method("force")(lambda ctx: None)


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_registering_a_method_name_twice_is_refused_and_keeps_the_first(structure):
    name = f"test_duplicate_{structure}"

    def first(ctx):
        pass

    def second(ctx):
        pass

    methods = force_core.registry._METHODS[structure]
    try:
        force_core.register_method(name, structure=structure, default_steps=3)(first)
        spec = force_core.get_method(name, structure)
        with pytest.raises(ValueError, match=rf"named '{name}' is already registered \(by .*first\)"):
            force_core.register_method(name, structure=structure, default_steps=3)(second)
        with pytest.raises(ValueError, match=f"'{name}' is already registered"):  # same function, other options
            force_core.register_method(name, structure=structure, default_steps=7)(first)
        force_core.register_method(name, structure=structure, default_steps=3)(first)  # the very same: no change
        assert force_core.get_method(name, structure) is spec and spec.fn is first and spec.default_steps == 3
        assert force_core.available_methods(structure).count(name) == 1
    finally:
        methods.pop(name, None)


def test_data_free_methods_are_what_the_registry_says():
    # (other tests register methods of their own: only the built-ins are checked)
    assert force_core.data_free_methods() & set(METHODS) == {"random", "magnitude", "synflow"}
    channel_builtins = {"force", "iter_snip", "snip", "magnitude", "random"}
    assert force_core.data_free_methods("channel") & channel_builtins == {"random", "magnitude"}
    for name in METHODS:
        assert force_core.needs_data(name) == (name in {"snip", "iter_snip", "force", "grasp"}), name
    assert not force_core.needs_data("magnitude", structure="channel") and force_core.needs_data("force", "channel")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        force_core.needs_data("nope")
    # synflow is data-free: its masks are the same for any batch of the input's shape (test_synflow_is_data_free)
    model = small_cnn()
    x, y = batch()
    a = compute_masks(model, [(torch.zeros_like(x), torch.zeros_like(y))], method="synflow", density=0.05, steps=3)
    b = compute_masks(model, [(x, y)], method="synflow", density=0.05, steps=3)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_one_clear_error(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        compute_masks(small_cnn(), [batch()], method="force", density=density)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'forse'.*force.*iter_snip"):
        compute_masks(small_cnn(), [batch()], method="forse", density=0.1)


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_batches_is_one_clear_error(empty):
    with pytest.raises(ValueError, match="batches is empty"):
        compute_masks(small_cnn(), empty, method="snip", density=0.1)


def test_model_without_prunable_layer_is_one_clear_error():
    with pytest.raises(ValueError, match="no prunable layer"):
        compute_masks(nn.Sequential(nn.Flatten(), nn.ReLU()), [batch()], method="snip", density=0.1)


def test_density_that_keeps_nothing_is_an_error():
    with pytest.raises(ValueError, match="keeps no weight"):
        compute_masks(small_cnn(), [batch()], method="snip", density=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_follow_the_model_onto_cuda():
    model = small_cnn().cuda()
    masks = compute_masks(model, [batch()], method="force", density=0.05, steps=3)
    assert all(m.device.type == "cuda" for m in masks.values())
    assert masks.total_kept() == round(0.05 * masks.total())
