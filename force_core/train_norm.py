"""Train-time normalization for networks whose BatchNorm was folded into the layers at export.

An eval-mode export (TorchScript with constant folding, the dynamo exporter) folds every BatchNorm into its
convolution, and the network left trains badly from scratch (issue 11: the loss sits at ln C from the first
epoch). `add_train_norm` gives each such layer back a BatchNorm that is the identity at the start (γ=1, β=0,
running mean 0, variance 1 − ε), so masks are computed and training runs with batch statistics as the paper's
networks do; `fold_train_norm` folds it into the layer's weight and bias afterwards, so the exported graph keeps
exactly the input's nodes and a pruned weight stays exactly 0 (0·scale = 0).

For trained weights (the finetune recipe) the identity at the start is the wrong start: in training mode it
re-standardises every layer and throws the trained function away. `calibrate_train_norm` fits each norm to the
dense network's activations instead (the identity on the data), and after pruning `recalibrate_train_norm`
re-estimates its running statistics on the pruned network, so each norm maps the pruned activations back to the
dense ones' statistics (BatchNorm recalibration): the pruned trained network works before any training step.

Works on any `torch.fx.GraphModule` (onnx2torch's output is one). Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

# A layer followed by one of these already has its normalization.
_NORMS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_BN_FOR_CONV = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SUFFIX = "__train_norm"
# ε of every inserted BatchNorm, and of its fold: 1e-4 rather than torch's 1e-5. A channel a sparse mask leaves with
# a few weights can vary hardly at all; 1/√(σ² + ε) multiplies it, its offsets and its rounding by up to 1/√ε,
# layer after layer, and the folded layer cancels a large W·s·x against its bias (mobilenet_v3_small, dynamo
# export, 95% random sparsity, 8 epochs, statistics re-estimated and constant channels silenced: with 1e-5 the
# export failed the 1e-4 torch/onnxruntime parity gate on 3 seeds of 3, by 1.3x to 9.5x; with 1e-4 it passed on
# all 3). A channel with σ² ≫ 1e-4 is unaffected (its scale changes by a relative 1e-4/(2σ²)); a larger ε (Keras'
# 1e-3) changes channels of σ² near 0.1 by 0.5%, which keeps `recalibrate_train_norm` from mapping a pruned
# network back onto the dense one's statistics.
_EPS = 1e-4
# A channel whose variance over the data is below this moves its normalised output by under 1% of γ: what varies
# is float rounding (a channel cut off by its masks, fed by constant channels, behind a ReLU dead on the data), which
# 1/√ε amplifies, and the folded layer then cancels a large W·s·x against its bias (an ill-conditioned export).
CONSTANT_VAR = 1e-4 * _EPS
CALIBRATION_BATCHES = 4  # batches `calibrate_train_norm` is given (masks and training alike: the first mask batches)


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dimension of a Linear's output, whatever its rank ((N, F) or (N, T, F))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] == 1:  # one sample has no batch statistics: use the running ones
            return nn.functional.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps).reshape(x.shape)
        return super().forward(flat).reshape(x.shape)


@dataclass(frozen=True)
class TrainNorm:
    """One inserted normalization: `layer` is the module path of the Conv/Linear, `norm` of its BatchNorm."""

    layer: str
    norm: str


def _layer_of(module: nn.Module) -> nn.Module | None:
    """The Conv/Linear whose output is this module's output (onnx2torch may wrap a layer with a pad)."""
    if isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    if isinstance(module, _ConvNd) and not module.transposed and module.weight.dim() - 2 in _BN_FOR_CONV:
        return module
    if isinstance(module, nn.Linear):
        return module
    return None


def candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """call_module nodes of Conv/Linear layers that have a bias (what BatchNorm folding leaves), are not followed
    by a normalization, do not share their weights with another layer, and do not feed the network's output
    without another such layer in between (the classifier keeps its raw logits)."""
    modules = dict(gm.named_modules())
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and _layer_of(modules[n.target]) is not None]
    counts: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    out = []
    for node in layer_nodes:
        layer = _layer_of(modules[node.target])
        if layer.bias is None or counts.get(id(layer.weight), 0) > 1 or counts.get(id(layer.bias), 0) > 1:
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _NORMS):
            continue
        if _reaches_output(node, set(layer_nodes)):
            continue
        out.append(node)
    return out


def _reaches_output(node: fx.Node, stops: set[fx.Node]) -> bool:
    seen, todo = set(), list(node.users)
    while todo:
        n = todo.pop()
        if n in seen or n in stops:
            continue
        if n.op == "output":
            return True
        seen.add(n)
        todo.extend(n.users)
    return False


def add_train_norm(gm: fx.GraphModule) -> list[TrainNorm]:
    """Insert an identity-initialised BatchNorm after every `candidates` layer (in graph order), in place; the
    BatchNorms are submodules named `<layer>__train_norm`, on the layer's device, and the layer's bias stops
    requiring a gradient. Returns what was inserted."""
    modules = dict(gm.named_modules())
    added = []
    for node in candidates(gm):
        layer = _layer_of(modules[node.target])
        features = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
        norm_cls = _BN_FOR_CONV[layer.weight.dim() - 2] if isinstance(layer, _ConvNd) else FeatureBatchNorm
        norm = norm_cls(features, eps=_EPS).to(device=layer.weight.device, dtype=layer.weight.dtype)
        norm.running_var.fill_(1.0 - _EPS)  # the identity in eval mode too, exactly: √(σ² + ε) = 1
        norm.train(gm.training)
        # The BatchNorm subtracts the batch mean, so the layer's bias gets no gradient but float noise, which
        # 1/√ε amplifies where a pruned channel is constant: it grows until the loss is NaN. It stays fixed
        # (β trains the shift) and folds in at the end.
        layer.bias.requires_grad_(False)
        name = f"{node.target}{SUFFIX}".replace(".", "_")
        gm.add_submodule(name, norm)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        added.append(TrainNorm(layer=_param_prefix(gm, layer), norm=name))
    gm.recompile()
    return added


@torch.no_grad()
def calibrate_train_norm(gm: nn.Module, norms: list[TrainNorm], inputs) -> None:
    """Make each inserted BatchNorm the identity on `inputs` (an iterable of input batches) instead of at the start:
    running mean and variance become the layer output's per-feature statistics over them, β that mean and γ
    √(variance + ε). The network then computes what it computed without the norms (trained weights keep their
    function: their folded BatchNorm statistics stay in force), while training still normalises with batch
    statistics. The norms are calibrated together, in one pass, in eval mode (where the identity-initialised
    ones pass their input through, exactly)."""
    if not norms:
        return
    modules = dict(gm.named_modules())
    sums: dict[str, list] = {}

    def hook(module, args, name):
        x = args[0].detach().double()
        flat = x.reshape(-1, x.shape[-1]) if isinstance(module, FeatureBatchNorm) else \
            x.transpose(0, 1).reshape(x.shape[1], -1).T
        s = sums.setdefault(name, [0.0, 0.0, 0])
        s[0] = s[0] + flat.sum(0)
        s[1] = s[1] + (flat * flat).sum(0)
        s[2] += flat.shape[0]

    handles = [modules[n.norm].register_forward_pre_hook(lambda m, a, name=n.norm: hook(m, a, name)) for n in norms]
    was_training = gm.training
    gm.eval()
    try:
        for x in inputs:
            gm(x)
    finally:
        for h in handles:
            h.remove()
        gm.train(was_training)
    for n in norms:
        norm = modules[n.norm]
        total, squares, count = sums[n.norm]
        mean = total / count
        var = (squares / count - mean * mean).clamp_(min=0.0)
        like = norm.running_mean
        norm.running_mean.copy_(mean.to(like))
        norm.running_var.copy_(var.to(like))
        norm.weight.copy_(torch.sqrt(var + norm.eps).to(like))
        norm.bias.copy_(mean.to(like))


@torch.no_grad()
def recalibrate_train_norm(gm: nn.Module, norms: list[TrainNorm], inputs) -> None:
    """Re-estimate the inserted BatchNorms' running statistics on `inputs` (an iterable of input batches), their γ
    and β kept: after pruning a network whose norms `calibrate_train_norm` fitted to its dense activations, each norm
    then maps the pruned network's activations back to the dense network's statistics in eval mode too (what it
    does with batch statistics in training), so the pruned trained network works before any training step. The
    other modules stay in eval mode; the statistics are plain averages over the batches."""
    if not norms:
        return
    modules = dict(gm.named_modules())
    was_training = gm.training
    gm.eval()
    saved = []
    for n in norms:
        norm = modules[n.norm]
        saved.append((norm, norm.momentum))
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
        norm.train()
    try:
        for x in inputs:
            gm(x)
    finally:
        for norm, momentum in saved:
            norm.momentum = momentum
        gm.train(was_training)


@torch.no_grad()
def silence_constant_channels(gm: nn.Module, norms: list[TrainNorm], floor: float = CONSTANT_VAR) -> int:
    """Make every channel of the inserted BatchNorms whose running variance is below `floor` (`CONSTANT_VAR`) the
    constant it is: γ = 0, so the norm outputs β there in eval mode, with batch statistics too, and
    `fold_train_norm` gives the layer a zero weight row and the bias β for it, exactly. Call it after the running
    statistics were estimated with the current weights (`recalibrate_train_norm`). Returns the channels silenced."""
    modules = dict(gm.named_modules())
    silenced = 0
    for n in norms:
        norm = modules[n.norm]
        small = norm.running_var < floor
        norm.weight.masked_fill_(small, 0.0)
        silenced += int(small.sum())
    return silenced


def _param_prefix(gm: nn.Module, layer: nn.Module) -> str:
    return next(path for path, m in gm.named_modules() if m is layer)


@torch.no_grad()
def fold_train_norm(state: Mapping[str, torch.Tensor], norms: list[TrainNorm]) -> dict[str, torch.Tensor]:
    """The state dict of the module without the inserted norms: each BatchNorm (eval statistics) folded into its
    layer, W' = W·s and b' = (b − μ)·s + β with s = γ/√(σ² + ε) per output feature, in float64; exact zeros
    of W stay exactly zero. The norm's own entries are dropped."""
    out = dict(state)
    for tn in norms:
        w_key, b_key = f"{tn.layer}.weight", f"{tn.layer}.bias"
        gamma, beta = out.pop(f"{tn.norm}.weight"), out.pop(f"{tn.norm}.bias")
        mean, var = out.pop(f"{tn.norm}.running_mean"), out.pop(f"{tn.norm}.running_var")
        out.pop(f"{tn.norm}.num_batches_tracked", None)
        w, b = out[w_key], out[b_key]
        scale = gamma.double() / torch.sqrt(var.double() + _EPS)
        shape = (-1,) + (1,) * (w.dim() - 1)
        out[w_key] = (w.double() * scale.reshape(shape)).to(w.dtype)
        out[b_key] = ((b.double() - mean.double()) * scale + beta.double()).to(b.dtype)
    return out


__all__ = ["CONSTANT_VAR", "FeatureBatchNorm", "TrainNorm", "add_train_norm", "candidates", "fold_train_norm",
           "silence_constant_channels"]
