"""force_core channel pruning: groups given by hand for tiny real networks, CPU, seconds."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import force_core
from force_core import ChannelGroup, ChannelSlice, channel_element_masks, compute_channel_masks, kept_count
from force_core.channels import ChannelFloorError, channel_force, channel_iter_snip, channel_snip
from force_core.methods import force as force_method

S = ChannelSlice
CHANNEL_METHODS = ["force", "iter_snip", "snip", "magnitude", "random"]


def conv_bn(c_in: int, c_out: int, **kw) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, **kw), nn.BatchNorm2d(c_out), nn.ReLU()]


def init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming weights as in the paper, and random BatchNorm affine/statistics so that a wrongly masked
    norm parameter or running statistic shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(1 + 0.1 * torch.rand(mod.running_var.shape, generator=g))
    return model


def norm_slices(bn: str) -> tuple[ChannelSlice, ...]:
    return (S(f"{bn}.weight", 0), S(f"{bn}.bias", 0))


def plain_net(seed: int = 0):
    """Conv-BN-ReLU-Conv-BN-ReLU-GAP-Linear, with its two channel groups."""
    model = init_(nn.Sequential(*conv_bn(3, 8), *conv_bn(8, 12), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(12, 10)), seed)  # fmt: skip
    groups = [
        ChannelGroup("0", 8, (S("0.weight", 0), S("0.bias", 0), *norm_slices("1"), S("3.weight", 1))),
        ChannelGroup("3", 12, (S("3.weight", 0), S("3.bias", 0), *norm_slices("4"), S("8.weight", 1))),
    ]
    return model, groups, ["0.weight", "3.weight", "8.weight"]


class Residual(nn.Module):
    """stem -> [conv1 -> conv2] + stem -> GAP -> fc: the Add couples the stem's and conv2's output channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        s = F.relu(self.stem_bn(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(s)))
        h = F.relu(self.bn2(self.conv2(h)) + s)
        return self.fc(h.mean((2, 3)))


def residual_net(seed: int = 0):
    groups = [
        ChannelGroup("res", 8, (S("stem.weight", 0), *norm_slices("stem_bn"), S("conv1.weight", 1),
                                S("conv2.weight", 0), S("conv2.bias", 0), *norm_slices("bn2"), S("fc.weight", 1))),
        ChannelGroup("mid", 6, (S("conv1.weight", 0), *norm_slices("bn1"), S("conv2.weight", 1))),
    ]  # fmt: skip
    return init_(Residual(), seed), groups, ["stem.weight", "conv1.weight", "conv2.weight", "fc.weight"]


def depthwise_net(seed: int = 0):
    """Conv -> depthwise conv (weight [8, 1, 3, 3]: its output and input channels are one group) -> pointwise."""
    model = init_(nn.Sequential(*conv_bn(3, 8, bias=False), *conv_bn(8, 8, groups=8, bias=False),
                                nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)), seed)  # fmt: skip
    groups = [
        ChannelGroup("dw", 8, (S("0.weight", 0), *norm_slices("1"), S("3.weight", 0), *norm_slices("4"),
                               S("6.weight", 1))),
        ChannelGroup("pw", 16, (S("6.weight", 0), S("6.bias", 0), *norm_slices("7"), S("11.weight", 1))),
    ]  # fmt: skip
    return model, groups, ["0.weight", "3.weight", "6.weight", "11.weight"]


class ConcatFlatten(nn.Module):
    """Two convs concatenated (the consumer's input axis holds two groups at offsets 0 and 4), then a strided
    conv flattened into a Linear (each of its channels is a block of 4x4 = 16 columns of fc.weight)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 16, 10)

    def forward(self, x):
        h = F.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(F.relu(self.c(h)).flatten(1))


def concat_net(seed: int = 0, min_keep: int = 1):
    groups = [
        ChannelGroup("a", 4, (S("a.weight", 0), S("a.bias", 0), S("c.weight", 1)), min_keep),
        ChannelGroup("b", 5, (S("b.weight", 0), S("b.bias", 0), S("c.weight", 1, offset=4)), min_keep),
        ChannelGroup("c", 6, (S("c.weight", 0), S("c.bias", 0), S("fc.weight", 1, block=16)), min_keep),
    ]
    return init_(ConcatFlatten(), seed), groups, ["a.weight", "b.weight", "c.weight", "fc.weight"]


NETS = {"plain": plain_net, "residual": residual_net, "depthwise": depthwise_net, "concat": concat_net}


def batch(seed: int = 0, n: int = 16, hw: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, 10, (n,), generator=g)


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(i) for i in range(n)]


def cut(model: nn.Module, groups, keep) -> nn.Module:
    """The smaller network with the pruned channels physically removed: every parameter indexed along each
    axis a group reaches by the entries of kept channels (plus the entries no group covers); BatchNorm
    statistics follow their weight; a depthwise conv's `groups` follows its channels."""
    kept_entries: dict[tuple[str, int], torch.Tensor] = {}
    params = dict(model.named_parameters())
    for g in groups:
        for s in g.slices:
            key = (s.param, s.dim)
            if key not in kept_entries:
                kept_entries[key] = torch.ones(params[s.param].shape[s.dim], dtype=torch.bool)
            covered = kept_entries[key][s.offset : s.offset + g.size * s.block]
            covered &= keep[g.name].repeat_interleave(s.block)
    small = copy.deepcopy(model)
    with torch.no_grad():
        for mod_name, mod in small.named_modules():
            for p_name, p in list(mod.named_parameters(recurse=False)):
                t = p.detach()
                for (name, dim), ok in kept_entries.items():
                    if name == f"{mod_name}.{p_name}":
                        t = t.index_select(dim, ok.nonzero().squeeze(1))
                setattr(mod, p_name, nn.Parameter(t))
            if isinstance(mod, nn.BatchNorm2d):
                ok = kept_entries[(f"{mod_name}.weight", 0)].nonzero().squeeze(1)
                mod.running_mean = mod.running_mean[ok]
                mod.running_var = mod.running_var[ok]
            if isinstance(mod, nn.Conv2d) and mod.groups > 1:
                mod.groups = mod.weight.shape[0]
    return small


def masked(model: nn.Module, groups, keep) -> nn.Module:
    """A copy of `model` with every parameter a group reaches (weights, biases, norms) multiplied by its mask."""
    model = copy.deepcopy(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    masks = channel_element_masks(shapes, groups, keep, list(shapes))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.mul_(masks[n])
    return model


def recording(method_fn):
    """A channel method (through the registry) that runs `method_fn` and records the scores and the kept
    channels of every selection."""
    scores: list[torch.Tensor] = []
    keeps: list[torch.Tensor] = []

    def run(ctx):
        keep_top = ctx.keep_top

        def keep_and_record(k):
            scores.append(ctx.scores.clone())
            out = keep_top(k)
            keeps.append(out.clone())
            return out

        ctx.keep_top = keep_and_record
        method_fn(ctx)

    return run, scores, keeps


def given_scores(values: torch.Tensor):
    """A channel method that selects on the given scores."""

    def run(ctx):
        ctx.scores.copy_(values)
        ctx.keep_top(ctx.k)

    return run


def brute_force_keep(groups, scores: torch.Tensor, shapes, params, k: int, costs=None) -> tuple[dict, int]:
    """The rule with no cleverness: distinct scores ranked, each group's min_keep best reserved, then prefix
    lengths tried one by one, counting kept weights from the element masks: the longest within k. With `costs`,
    a weight of parameter n counts costs[n], and channels rank by score per cost (the cost of the weights that
    pruning the channel alone removes)."""
    starts = torch.tensor([0] + [g.size for g in groups]).cumsum(0).tolist()
    priced, costs = costs is not None, costs or dict.fromkeys(params, 1)

    def kept_cost(flat):
        keep = {g.name: flat[starts[i] : starts[i + 1]] for i, g in enumerate(groups)}
        return sum(int(m.sum()) * costs[n] for n, m in channel_element_masks(shapes, groups, keep, params).items())

    full = kept_cost(torch.ones(len(scores), dtype=torch.bool))
    price = torch.tensor([full - kept_cost(torch.arange(len(scores)) != c) for c in range(len(scores))]).float()
    order = torch.argsort(scores / price if priced else scores, descending=True).tolist()
    group_of = [next(i for i in range(len(groups)) if starts[i] <= c < starts[i + 1]) for c in range(len(scores))]
    reserved = []
    for i, g in enumerate(groups):
        reserved += [c for c in order if group_of[c] == i][: g.min_keep]
    rest = [c for c in order if c not in reserved]
    best = None
    for length in range(len(rest) + 1):
        flat = torch.zeros(len(scores), dtype=torch.bool)
        flat[reserved + rest[:length]] = True
        keep = {g.name: flat[starts[i] : starts[i + 1]] for i, g in enumerate(groups)}
        kept = kept_cost(flat)
        if kept <= k:
            best = keep, kept
    assert best is not None, "the reserved channels alone exceed k"
    return best


# ---------------------------------------------------------------- the selection rule


@pytest.mark.parametrize("net", ["plain", "concat"])
@pytest.mark.parametrize("density", [0.9, 0.5, 0.3, 0.17])
def test_kept_weights_are_the_longest_prefix_within_k(net, density):
    model, groups, params = NETS[net](seed=1)
    if net == "concat":
        groups[0] = ChannelGroup(groups[0].name, groups[0].size, groups[0].slices, min_keep=2)  # floor: 0.159
    n_channels = sum(g.size for g in groups)
    values = torch.randperm(n_channels, generator=torch.Generator().manual_seed(3)).float()
    name = f"test_given_scores_{net}_{density}"
    force_core.register_method(name, structure="channel", single_shot=True, needs_data=False)(given_scores(values))
    result = compute_channel_masks(model, None, groups, method=name, density=density, params=params)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    n_total = sum(shapes[n].numel() for n in params)
    k = kept_count(density, n_total)
    expected, expected_kept = brute_force_keep(groups, values, shapes, params, k)
    assert {n: v.tolist() for n, v in result.keep.items()} == {n: v.tolist() for n, v in expected.items()}
    assert result.meta["kept_weights"] == result.masks.total_kept() == expected_kept <= k
    assert result.meta["k"] == k and result.meta["total_weights"] == n_total == result.masks.total()
    assert result.meta["achieved_density"] == expected_kept / n_total <= density + 0.5 / n_total
    assert all(int(v.sum()) >= g.min_keep for g, v in zip(groups, result.keep.values(), strict=True))


@pytest.mark.parametrize("density", [0.7, 0.4])
def test_a_cost_budget_ranks_channels_by_score_per_cost_and_keeps_the_cost_within_k(density):
    """MACs as the budget: the first conv runs at 4x the positions of the second (as a layer at 56x56 against one
    at 28x28); k counts weights times their cost, and channels are a knapsack ranked by score per cost."""
    model, groups, params = plain_net(seed=1)
    costs = {"0.weight": 64, "3.weight": 16, "8.weight": 1}
    values = torch.randperm(20, generator=torch.Generator().manual_seed(3)).float() + 1
    name = f"test_given_scores_costs_{density}"
    force_core.register_method(name, structure="channel", single_shot=True, needs_data=False)(given_scores(values))
    result = compute_channel_masks(model, None, groups, method=name, density=density, params=params, costs=costs)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    total = sum(shapes[n].numel() * costs[n] for n in params)
    k = kept_count(density, total)
    expected, expected_cost = brute_force_keep(groups, values, shapes, params, k, costs)
    assert {n: v.tolist() for n, v in result.keep.items()} == {n: v.tolist() for n, v in expected.items()}
    assert result.meta["kept_cost"] == expected_cost <= k and result.meta["total_cost"] == total
    assert result.meta["budget"] == "costs" and result.meta["achieved_density"] == expected_cost / total
    assert result.meta["kept_weights"] == result.masks.total_kept()
    # the same scores under a weight budget keep other channels: the price changed the choice
    plain = compute_channel_masks(model, None, groups, method=name, density=density, params=params)
    assert {n: v.tolist() for n, v in plain.keep.items()} != {n: v.tolist() for n, v in result.keep.items()}
    # unit costs are the weight budget
    ones = compute_channel_masks(model, None, groups, method=name, density=density, params=params,
                                 costs=dict.fromkeys(params, 1))
    assert {n: v.tolist() for n, v in ones.keep.items()} == {n: v.tolist() for n, v in plain.keep.items()}


@pytest.mark.parametrize("density", [0.7, 0.4])
def test_ranked_per_group_channels_compete_on_their_score_over_their_groups_mean(density):
    """Scores that fall with depth (the second group's 100 times smaller, as connection sensitivity at init): ranked
    globally, the price cannot win the deep channels back; ranked per group, the selection is the knapsack on each
    score over its group's mean, whatever each group's scale."""
    model, groups, params = plain_net(seed=1)
    costs = {"0.weight": 64, "3.weight": 16, "8.weight": 1}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    values = torch.randperm(20, generator=torch.Generator().manual_seed(5)).float() + 1
    deep_small = torch.cat([values[:8], values[8:] / 100])
    keeps = {}
    for label, given, per_group in (("global", deep_small, False), ("per group", deep_small, True),
                                    ("per group, other scales", torch.cat([values[:8] * 7, values[8:]]), True)):
        name = f"test_given_scores_ranking_{density}_{label}"
        force_core.register_method(name, structure="channel", single_shot=True, needs_data=False)(given_scores(given))
        result = compute_channel_masks(model, None, groups, method=name, density=density, params=params, costs=costs,
                                       per_group=per_group)
        assert result.meta["ranking"] == ("per group" if per_group else "global")
        keeps[label] = {n: v.tolist() for n, v in result.keep.items()}
    total = sum(shapes[n].numel() * costs[n] for n in params)
    normalized = torch.cat([values[:8] / values[:8].mean(), values[8:] / values[8:].mean()])
    expected, _ = brute_force_keep(groups, normalized, shapes, params, kept_count(density, total), costs)
    assert keeps["per group"] == keeps["per group, other scales"] == {n: v.tolist() for n, v in expected.items()}
    assert sum(keeps["per group"]["3"]) > sum(keeps["global"]["3"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("density", "weight_density"), [(0.5, 0.3), (0.6, 0.25), (0.4, 0.5), (0.7, 0.2)])
def test_a_cost_and_a_weight_budget_together_keep_channels_within_both_near_the_exact_best(seed, density,
                                                                                          weight_density):
    """MACs and a file size at once. plain_net's kept weights and MACs depend only on how many channels each group
    keeps, so the exact best selection is each group's best channels at the best pair of counts within both
    budgets: ours fits both and keeps at least 0.9 of its score (the greedy price mix loses at most the blocks left
    out at the margin), never less than the cost budget's own choice when that already fits the weights."""
    model, groups, params = plain_net(seed=1)
    costs = {"0.weight": 64, "3.weight": 16, "8.weight": 1}
    values = torch.randperm(20, generator=torch.Generator().manual_seed(seed)).float() + 1
    name = f"test_given_scores_two_budgets_{seed}_{density}_{weight_density}"
    force_core.register_method(name, structure="channel", single_shot=True, needs_data=False)(given_scores(values))
    result = compute_channel_masks(model, None, groups, method=name, density=density, params=params, costs=costs,
                                   weight_density=weight_density)
    alone = compute_channel_masks(model, None, groups, method=name, density=density, params=params, costs=costs)

    def counted(k0: int, k3: int) -> tuple[int, int]:  # (weights, MACs) of 0.weight, 3.weight and 8.weight
        w = (k0 * 27, k0 * k3 * 9, 10 * k3)
        return sum(w), w[0] * 64 + w[1] * 16 + w[2]

    def score(r) -> float:
        return float(values[torch.cat([r.keep["0"], r.keep["3"]])].sum())

    cap, k = kept_count(weight_density, counted(8, 12)[0]), kept_count(density, counted(8, 12)[1])
    best = [sorted(values[:8].tolist(), reverse=True), sorted(values[8:].tolist(), reverse=True)]
    exact = max(sum(best[0][:a]) + sum(best[1][:b]) for a in range(1, 9) for b in range(1, 13)
                if counted(a, b)[0] <= cap and counted(a, b)[1] <= k)
    got = score(result)
    assert result.meta["kept_weights"] <= cap and result.meta["kept_cost"] <= k
    assert result.meta["kept_weights"] == result.masks.total_kept() and result.meta["weight_density"] == weight_density
    assert alone.meta["kept_weights"] > cap or got >= score(alone)
    assert exact * 0.9 <= got <= exact
    # a weight budget that does not bind keeps at least the cost budget's own choice (one of the mixes is it)
    loose = compute_channel_masks(model, None, groups, method=name, density=density, params=params, costs=costs,
                                  weight_density=1.0)
    assert loose.meta["kept_cost"] <= k and score(loose) >= score(alone)


def test_a_weight_budget_below_every_groups_floor_names_the_reachable_weight_sparsity():
    model, groups, params = plain_net()
    costs = dict.fromkeys(params, 3)
    with pytest.raises(ChannelFloorError, match="largest reachable weight sparsity is 0.9") as e:
        compute_channel_masks(model, None, groups, method="magnitude", density=0.5, params=params, costs=costs,
                              weight_density=0.01)
    assert e.value.weights
    with pytest.raises(ValueError, match="beside costs"):
        compute_channel_masks(model, None, groups, method="magnitude", density=0.5, params=params, weight_density=0.5)


@pytest.mark.parametrize("bad", [{"0.weight": 0}, {"0.weight": 1.5}, {}])
def test_a_cost_budget_needs_an_integer_cost_for_every_prunable_weight(bad):
    model, groups, params = plain_net()
    costs = {**dict.fromkeys(params, 2), **bad} if bad else {"0.weight": 2}
    with pytest.raises(ValueError, match="costs must give every prunable parameter an integer cost >= 1"):
        compute_channel_masks(model, None, groups, method="magnitude", density=0.5, params=params, costs=costs)


def test_ties_are_broken_the_same_way_every_time():
    model, groups, params = plain_net()
    force_core.register_method("test_all_tied", structure="channel", single_shot=True, needs_data=False)(
        given_scores(torch.zeros(20))
    )
    runs = [compute_channel_masks(model, None, groups, method="test_all_tied", density=0.4, params=params, seed=s)
            for s in (0, 0, 5)]  # fmt: skip
    assert all(torch.equal(runs[0].keep[n], runs[1].keep[n]) for n in runs[0].keep)
    assert any(not torch.equal(runs[0].keep[n], runs[2].keep[n]) for n in runs[0].keep)  # the seed decides
    assert runs[0].meta["kept_weights"] <= kept_count(0.4, 1200)


def test_min_keep_channels_survive_an_extreme_sparsity():
    model, groups, params = concat_net(min_keep=2)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    # Two channels in each group: a 2x3x3x3 + 2x3x3x3 + 2x4x3x3 + 10x2x16 -> the floor of kept weights.
    floor = 2 * 27 + 2 * 27 + 2 * 4 * 9 + 10 * 2 * 16
    n_total = sum(shapes[n].numel() for n in params)
    for method in CHANNEL_METHODS:
        result = compute_channel_masks(model, batches(), groups, method=method, density=floor / n_total,
                                       params=params, steps=3)  # fmt: skip
        assert result.meta["group_kept"] == {"a": 2, "b": 2, "c": 2}, method
        assert result.meta["kept_weights"] == floor, method


def test_unreachable_sparsity_names_the_largest_reachable_one():
    model, groups, params = plain_net()
    # One channel per group: 1x3x3x3 + 1x1x3x3 + 10x1 = 46 of 1200 weights -> sparsity 0.9616 at most.
    with pytest.raises(ValueError, match=r"largest reachable sparsity is 0\.9616"):
        compute_channel_masks(model, batches(), groups, method="force", density=0.03, params=params)
    result = compute_channel_masks(model, batches(), groups, method="force", density=1 - 0.9616, params=params,
                                   steps=3)  # fmt: skip
    assert result.meta["kept_weights"] == 46 and result.meta["channels_kept"] == 2


def test_nothing_channel_prunable_is_one_clear_error():
    model, groups, params = plain_net()
    with pytest.raises(ValueError, match="nothing is channel-prunable"):
        compute_channel_masks(model, batches(), [], method="snip", density=0.5, params=params)
    bias_only = [ChannelGroup("b", 8, (S("0.bias", 0), *norm_slices("1")))]
    with pytest.raises(ValueError, match="nothing is channel-prunable"):
        compute_channel_masks(model, batches(), bias_only, method="snip", density=0.5, params=params)


def test_bad_groups_name_the_group_and_the_valid_range():
    model, groups, params = plain_net()
    too_long = [ChannelGroup("fc_in", 8, (S("8.weight", 1, offset=6),))]
    with pytest.raises(ValueError, match=r"'fc_in'.*offset \+ size\*block <= 12"):
        compute_channel_masks(model, None, too_long, method="random", density=0.5, params=params)
    with pytest.raises(ValueError, match=r"'x'.*min_keep must be in \[1, 8\]"):
        compute_channel_masks(model, None, [ChannelGroup("x", 8, groups[0].slices, 9)], method="random",
                              density=0.5, params=params)  # fmt: skip
    with pytest.raises(ValueError, match="not a parameter"):
        compute_channel_masks(model, None, [ChannelGroup("x", 8, (S("nope", 0),))], method="random",
                              density=0.5, params=params)  # fmt: skip


# ---------------------------------------------------------------- slice semantics


@pytest.mark.parametrize("net", list(NETS))
def test_masked_network_equals_the_network_with_channels_removed(net):
    model, groups, params = NETS[net]()
    result = compute_channel_masks(model, None, groups, method="random", density=0.35, params=params, seed=2)
    assert all(0 < int(v.sum()) < v.numel() for v in result.keep.values())  # every group loses channels
    small = cut(model, groups, result.keep).eval()
    x, _ = batch(5)
    with torch.no_grad():
        expected = small(x)
        assert torch.allclose(masked(model, groups, result.keep).eval()(x), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(model.eval()(x), expected, atol=1e-3)  # the cut does change the network
    # The kept weights are exactly the weights of the smaller network, layer by layer.
    small_params = dict(small.named_parameters())
    assert result.masks.kept() == {n: small_params[n].numel() for n in params}
    assert result.meta["kept_weights"] == sum(small_params[n].numel() for n in params)
    # Element masks over the prunable weights are those of the full set of parameters.
    shapes = {n: p.shape for n, p in model.named_parameters()}
    full = channel_element_masks(shapes, groups, result.keep, list(shapes))
    assert all(torch.equal(result.masks[n], full[n]) for n in params)


def test_a_weight_shared_by_two_pruned_channels_is_counted_once():
    # conv "3.weight" [12, 8, 3, 3] lies in both groups (output axis of "3", input axis of "0").
    model, groups, params = plain_net()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    keep = {"0": torch.arange(8) < 3, "3": torch.arange(12) < 5}
    masks = channel_element_masks(shapes, groups, keep, params)
    assert [int(masks[n].sum()) for n in params] == [3 * 27, 5 * 3 * 9, 10 * 5]
    assert masks["3.weight"][:5, :3].all() and not masks["3.weight"][5:].any() and not masks["3.weight"][:, 3:].any()


# ---------------------------------------------------------------- the methods


def test_channel_snip_scores_are_the_gate_gradients():
    # |Σ θ0 · ∂L/∂θ| over a channel's prunable entries = |∂L/∂g| for a gate g = 1 scaling those entries.
    model, groups, params = residual_net()
    run, scores, _ = recording(channel_snip)
    force_core.register_method("test_snip_recorded", structure="channel", single_shot=True)(run)
    b = batch(1)
    compute_channel_masks(model, [b], groups, method="test_snip_recorded", density=0.5, params=params)
    ref = copy.deepcopy(model).train()
    F.cross_entropy(ref(b[0]), b[1]).backward()
    p = dict(ref.named_parameters())
    expected = []
    for g in groups:
        total = torch.zeros(g.size)
        for s in g.slices:
            if s.param in params:
                prod = (p[s.param] * p[s.param].grad).detach().movedim(s.dim, 0)
                total += prod[s.offset : s.offset + g.size * s.block].reshape(g.size, -1).sum(1)
        expected.append(total.abs())
    assert torch.allclose(scores[0], torch.cat(expected), rtol=1e-4, atol=1e-7)


def test_magnitude_is_the_mean_absolute_weight_and_needs_no_data():
    model, groups, params = plain_net()
    with torch.no_grad():
        model[3].weight[:, 5] *= 10  # channel 5 of group "0" as consumer input only
        model[8].weight[:, 7] *= 50  # channel 7 of group "3" as fc input only
    run, scores, _ = recording(force_core.get_method("magnitude", structure="channel").fn)
    force_core.register_method("test_magnitude_recorded", structure="channel", single_shot=True,
                               needs_data=False)(run)  # fmt: skip
    result = compute_channel_masks(model, None, groups, method="test_magnitude_recorded", density=0.3,
                                   params=params)  # fmt: skip
    w0, w3, w8 = (model[i].weight.detach().abs() for i in (0, 3, 8))
    mean0 = (w0.sum((1, 2, 3)) + w3.sum((0, 2, 3))) / (27 + 12 * 9)
    mean3 = (w3.sum((1, 2, 3)) + w8.sum(0)) / (8 * 9 + 10)
    assert torch.allclose(scores[0], torch.cat([mean0, mean3]))
    assert result.keep["0"][5] and result.keep["3"][7]
    again = compute_channel_masks(model, [], groups, method="magnitude", density=0.3, params=params)
    assert torch.equal(again.keep["0"], result.keep["0"]) and torch.equal(again.keep["3"], result.keep["3"])


def test_random_needs_no_data_and_follows_the_seed():
    model, groups, params = depthwise_net()
    a = compute_channel_masks(model, None, groups, method="random", density=0.4, params=params, seed=3)
    b = compute_channel_masks(model, None, groups, method="random", density=0.4, params=params, seed=3)
    c = compute_channel_masks(model, None, groups, method="random", density=0.4, params=params, seed=4)
    assert all(torch.equal(a.keep[n], b.keep[n]) for n in a.keep)
    assert any(not torch.equal(a.keep[n], c.keep[n]) for n in a.keep)
    with pytest.raises(ValueError, match="scores channels on data"):
        compute_channel_masks(model, None, groups, method="snip", density=0.4, params=params)


def feature_mlp(seed: int = 0):
    """Linear-ReLU-Linear on 20 raw features; the input features are a group of their own, reaching only the
    first layer's input axis: a pruned feature still feeds its data forward, so its saliency stays informative."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10))
    groups = [
        ChannelGroup("features", 20, (S("0.weight", 1),)),
        ChannelGroup("hidden", 16, (S("0.weight", 0), S("0.bias", 0), S("2.weight", 1))),
    ]
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(32, 20, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(8)]
    return model, groups, ["0.weight", "2.weight"], data


def test_channel_force_brings_pruned_channels_back_and_iter_snip_never_does():
    model, groups, params, data = feature_mlp()
    run_f, _, force_keeps = recording(channel_force)
    run_i, _, iter_keeps = recording(channel_iter_snip)
    force_core.register_method("test_channel_force_recorded", structure="channel", default_steps=8)(run_f)
    force_core.register_method("test_channel_iter_snip_recorded", structure="channel", default_steps=8)(run_i)
    for name in ("test_channel_force_recorded", "test_channel_iter_snip_recorded"):
        compute_channel_masks(model, data, groups, method=name, density=0.1, params=params)
    assert len(force_keeps) == len(iter_keeps) == 8
    back = [int((after & ~before).sum()) for before, after in zip(force_keeps, force_keeps[1:], strict=False)]
    assert sum(back) > 0, back
    final = force_keeps[-1]
    assert any(bool((final & ~keep).any()) for keep in force_keeps[:-1])  # pruned at some step, kept at the end
    for before, after in zip(iter_keeps, iter_keeps[1:], strict=False):
        assert not (after & ~before).any()  # nested


def reading(groups, params):
    """`groups` with the slices that read the channels marked: the input axis (dim 1) of a weight."""
    return [ChannelGroup(g.name, g.size, tuple(dataclasses.replace(s, consumer=s.param in params and s.dim == 1)
                                               for s in g.slices), g.min_keep) for g in groups]


def test_pruned_conv_channels_are_scored_through_their_consumers_and_force_brings_some_back():
    # Saliency masks only the slices that read a channel: a pruned channel is still produced, its consumers'
    # gradients score it, and FORCE can keep it again at a later step (FORCE.md: pruned weights' gradients are
    # not blocked). Without consumer slices a pruned channel has no activation and scores exactly 0.
    model, groups, params = plain_net()
    run, scores, keeps = recording(channel_force)
    force_core.register_method("test_channel_force_read", structure="channel", default_steps=8)(run)
    compute_channel_masks(model, batches(8), reading(groups, params), method="test_channel_force_read",
                          density=0.12, params=params)  # fmt: skip
    for keep, after in zip(keeps, scores[1:], strict=False):
        assert (~keep).any() and bool((after[~keep] > 0).all())
    back = [int((after & ~before).sum()) for before, after in zip(keeps, keeps[1:], strict=False)]
    assert sum(back) > 0, back

    run0, scores0, keeps0 = recording(channel_force)
    force_core.register_method("test_channel_force_unread", structure="channel", default_steps=4)(run0)
    compute_channel_masks(model, batches(4), groups, method="test_channel_force_unread", density=0.12, params=params)
    for keep, after in zip(keeps0, scores0[1:], strict=False):
        assert bool((after[~keep] == 0).all())


def test_steps_follow_the_schedule_with_fresh_batches_each_step():
    model, groups, params = plain_net()
    seen = []
    result = compute_channel_masks(model, batches(4), groups, method="force", density=0.2, params=params, steps=4,
                                   batches_per_step=2, progress=lambda *step: seen.append(step))  # fmt: skip
    assert [(t, n) for t, n, _ in seen] == [(t, 4) for t in range(1, 5)]
    assert [info["density"] for *_, info in seen] == force_core.density_schedule(0.2, 4)
    assert all(info["kept"] <= kept_count(info["density"], 1200) for *_, info in seen)
    losses = result.meta["step_losses"]
    assert len(losses) == 8 and len(set(losses[:4])) == 4  # 4 different batches, then the cycle again
    assert result.meta["steps"] == 4 and result.meta["structure"] == "channel" and result.meta["method"] == "force"


def test_same_inputs_give_same_channels():
    model, groups, params = residual_net(2)
    for method in CHANNEL_METHODS:
        a = compute_channel_masks(model, batches(), groups, method=method, density=0.3, params=params, steps=4)
        b = compute_channel_masks(copy.deepcopy(model), batches(), groups, method=method, density=0.3,
                                  params=params, steps=4)  # fmt: skip
        assert all(torch.equal(a.keep[n], b.keep[n]) for n in a.keep), method
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks), method


def test_model_state_untouched():
    model, groups, params = residual_net()
    x, y = batch()
    model.train()
    F.cross_entropy(model(x), y).backward()  # running stats and gradients set
    model.eval()
    model.bn1.train()
    model.fc.weight.requires_grad_(False)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    for method in CHANNEL_METHODS:
        compute_channel_masks(model, [(x, y)], groups, method=method, density=0.3, params=params, steps=2)
        assert all(torch.equal(p, state[n]) for n, p in model.named_parameters()), method
        assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if grads[n] is not None)
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()), method
        assert [m.training for m in model.modules()] == modes, method
        assert [p.requires_grad for p in model.parameters()] == [n != "fc.weight" for n in state], method


def test_meta_reports_channels_and_weights():
    model, groups, params = concat_net()
    extra = ChannelGroup("bias_only", 4, (S("a.bias", 0),))  # reaches no prunable weight: kept whole
    result = compute_channel_masks(model, batches(), [*groups, extra], method="snip", density=0.4, params=params)
    meta = result.meta
    assert meta["unprunable_groups"] == ["bias_only"] and bool(result.keep["bias_only"].all())
    assert meta["channels_total"] == 4 + 5 + 6 + 4
    assert meta["channels_kept"] == sum(int(v.sum()) for v in result.keep.values())
    assert meta["group_kept"] == {n: int(v.sum()) for n, v in result.keep.items()}
    assert meta["target_density"] == 0.4 and meta["achieved_density"] <= 0.4 + 0.5 / meta["total_weights"]
    assert meta["kept"] == result.masks.kept() and result.masks.meta == meta
    assert list(result.masks) == params


# ---------------------------------------------------------------- the registry


def test_registry_keeps_channel_and_unstructured_methods_apart():
    assert force_core.available_methods(structure="channel")[:5] == CHANNEL_METHODS
    assert "grasp" in force_core.available_methods() and "grasp" not in force_core.available_methods("channel")
    assert force_core.get_method("force").fn is force_method
    spec = force_core.get_method("force", structure="channel")
    assert spec.fn is channel_force and spec.structure == "channel" and spec.default_steps == 20
    assert not force_core.get_method("magnitude", "channel").needs_data
    with pytest.raises(ValueError, match=r"unknown channel method 'grasp'; valid channel methods: force"):
        force_core.get_method("grasp", structure="channel")
    with pytest.raises(ValueError, match="structure must be one of unstructured, channel"):
        force_core.available_methods(structure="block")
    with pytest.raises(ValueError, match="already registered"):
        force_core.register_method("snip", structure="channel")(lambda ctx: None)
    with pytest.raises(ValueError, match="unknown channel method"):
        compute_channel_masks(*plain_net()[:1], None, plain_net()[1], method="grasp", density=0.5, params=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_channels_for_one_step_methods():
    model, groups, params = depthwise_net()
    data = batches(1)
    for method in ["snip", "magnitude", "random"]:
        cpu = compute_channel_masks(model, data, groups, method=method, density=0.3, params=params)
        cuda = compute_channel_masks(copy.deepcopy(model).cuda(), data, groups, method=method, density=0.3,
                                     params=params)  # fmt: skip
        assert cuda.masks["3.weight"].device.type == "cuda"
        assert all(torch.equal(cpu.keep[n], cuda.keep[n].cpu()) for n in cpu.keep), method


@pytest.mark.parametrize("multiple", [2, 4])
def test_channels_are_kept_in_blocks_of_the_multiple_best_first(multiple):
    model, groups, params = plain_net(seed=2)  # groups of 8 and 12 channels
    values = torch.randperm(20, generator=torch.Generator().manual_seed(5)).float()
    force_core.register_method(f"test_blocks_{multiple}", structure="channel", single_shot=True,
                               needs_data=False)(given_scores(values))  # fmt: skip
    result = compute_channel_masks(model, None, groups, method=f"test_blocks_{multiple}", density=0.35,
                                   params=params, multiple=multiple)  # fmt: skip
    assert result.meta["kept_weights"] <= kept_count(0.35, 1200) and result.meta["multiple"] == multiple
    start = 0
    for g in groups:
        kept, scores = result.keep[g.name], values[start : start + g.size]
        n = int(kept.sum())
        assert n % multiple == 0 and n >= multiple
        assert set(torch.nonzero(kept).flatten().tolist()) == set(torch.argsort(scores, descending=True)[:n].tolist())
        start += g.size


def test_groups_no_larger_than_the_multiple_are_kept_whole():
    model, groups, params = plain_net()
    with pytest.raises(ValueError, match="nothing is channel-prunable in blocks of 16"):
        compute_channel_masks(model, None, groups, method="magnitude", density=0.5, params=params, multiple=16)


def relu_chain(depth: int = 8, width: int = 16, seed: int = 0):
    """A deep narrow Conv-ReLU chain and its channel groups: channel FORCE at a few percent leaves its early layers
    one channel each, and the outputs stop depending on the input."""
    torch.manual_seed(seed)
    layers, c = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    convs = [i for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    groups = [ChannelGroup(f"g{i}", width, (S(f"{i}.weight", 0), S(f"{i}.bias", 0),
                                             S(f"{(convs + [len(model) - 1])[j + 1]}.weight", 1, consumer=True)))
              for j, i in enumerate(convs)]
    return model, groups


def test_channel_force_records_a_collapse_and_leaves_a_healthy_run_as_the_paper_has_it():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(12)]
    model, groups = relu_chain()
    runs = {rule: compute_channel_masks(model, data, groups, method="force", density=0.05, params=None, steps=10,
                                        on_collapse=rule) for rule in ("none", "nested")}
    assert runs["none"].meta["collapse_step"] is None and runs["none"].meta["on_collapse"] == "none"
    assert 1 <= runs["nested"].meta["collapse_step"] <= 11  # found: the saliencies after it were ties at 0
    healthy = {rule: compute_channel_masks(model, data, groups, method="force", density=0.5, params=None, steps=5,
                                           on_collapse=rule) for rule in ("none", "nested")}
    assert healthy["nested"].meta["collapse_step"] is None
    assert all(torch.equal(healthy["none"].keep[k], healthy["nested"].keep[k]) for k in healthy["none"].keep)
    with pytest.raises(ValueError, match="on_collapse must be one of nested, none"):
        compute_channel_masks(model, data, groups, method="force", density=0.5, params=None, on_collapse="retry")
