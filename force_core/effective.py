"""Effective sparsity: which kept weights lie on at least one input→output path of the masked network.

Data-free (issue 11, point 3): masks as positive weights, a positive input, and a kept weight counts iff its
gradient is non-zero (see `effective_sparsity` for why the positives are random rather than ones).
Pure PyTorch: imports torch only, never onnx, prefect, click, pipeline or stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase

# Normalization layers whose scale is a positive factor on the path, whatever its value (a zero-initialized
# γ, as in zero_init_residual, would otherwise read as a cut branch): γ → 1, β → 0.
_NORM_TYPES = (_NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class EffectiveSparsity:
    """Per masked parameter: `sizes` (weights), `kept` (mask true), `effective_kept` (kept and on a path).
    `cut_layers`: parameters that keep no weight, or keep some but none on a path, in the masks' order."""

    sizes: dict[str, int]
    kept: dict[str, int]
    effective_kept: dict[str, int]
    effective_kept_total: int
    effective_density: float  # effective kept / all prunable weights
    cut_layers: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def kept_total(self) -> int:
        return sum(self.kept.values())

    @property
    def density(self) -> float:
        return self.kept_total / self.total if self.total else 1.0


def effective_sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor],
                       inputs: Sequence[int] | torch.Tensor) -> EffectiveSparsity:
    """Effective kept weights of `masks` (parameter name → bool mask) on `model`, for an input of shape `inputs`
    ((C, H, W), no batch dimension) or of the shape of the example tensor `inputs` (batch dimension first).

    One forward and backward pass of a batch of one, in float64 (float32 for a graph that casts to float32 itself)
    and eval mode, through
    `torch.func.functional_call` (the model's parameters, buffers and train/eval modes are left exactly as
    found; nothing is copied but the substitutes). The substitutes make every path positive, so that nothing
    cancels: a masked weight becomes mask · u / (sum of mask · u over its row along dim 0), u drawn from
    U[0.5, 1.5) with a fixed seed, so each output is a weighted average of its inputs and activations stay
    near 1 however deep the network (for a layout with inputs along dim 0, a ConvTranspose's or a MatMul's,
    each input's outgoing weights sum to 1: bounded as well); a parameter named `*bias` becomes 0 (a bias would
    feed later layers with no path from the input); a normalization layer's γ becomes 1 and β 0 (a γ of 0, as
    zero_init_residual leaves it, would read as a cut branch); every other parameter its absolute value;
    running_mean 0 and running_var 1 (a BatchNorm, including one inserted for training, is then a positive
    scaling). The input is U[0.5, 1.5) too, and R = Σ c·output with c from U[0.5, 1.5) (a plain sum of a
    softmax output is 1 whatever the weights). A kept weight is effective iff ∂R/∂w ≠ 0. A weight that only
    ever multiplies zero padding (a 3×3 tap of a layer run at 1×1) is not effective: at this input size no
    input reaches it.

    Why random factors rather than masks and ones as they are: with uniform values a LayerNorm (or an
    InstanceNorm, over space) sees a constant vector, whose changes it maps to 0, and a softmax output shifts
    every logit alike, which it ignores: both would hide real paths (a tiny ViT read as 1.4% effective). Random
    positive values break those ties (an exact cancellation then has probability 0) and keep every path positive.

    Max pooling passes gradient to each window's argmax only: a max-pool module's output is replaced by the
    average over the same windows, which reaches every position of a window (each is the max for some input).

    Known limits: a max pool called as a function in `forward` (not a module) is not replaced, so positions
    it never picks read as ineffective; saturating activations (Hardsigmoid above 3, a clamp) pass no
    gradient and can hide a path (the weighted averages keep activations near 1, below such thresholds).
    A gradient that is NaN counts as effective (never a false cut).
    """
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"masks for names that are not parameters of the model: {unknown[:5]}")
    for n, m in masks.items():
        if tuple(m.shape) != tuple(params[n].shape):
            raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, the parameter has {tuple(params[n].shape)}")
    shape = tuple(inputs.shape[1:]) if isinstance(inputs, torch.Tensor) else tuple(int(d) for d in inputs)
    device = next(iter(params.values())).device if params else torch.device("cpu")

    norm_params = {f"{mod_name}.{p_name}" if mod_name else p_name: p_name
                   for mod_name, module in model.named_modules() if isinstance(module, _NORM_TYPES)
                   for p_name, _ in module.named_parameters(recurse=False)}
    try:
        grads = _gradients_in(torch.float64, model, masks, params, norm_params, shape, device)
    except RuntimeError:  # a graph that casts to float32 itself (an ONNX Cast) cannot run in float64
        grads = _gradients_in(torch.float32, model, masks, params, norm_params, shape, device)
    probes = dict(zip([n for n in params if n in masks], grads, strict=True))
    effective = {n: int(torch.count_nonzero(masks[n].to(g.device) & (g != 0))) if g is not None else 0
                 for n, g in probes.items()}
    kept = {n: int(torch.count_nonzero(m)) for n, m in masks.items()}
    sizes = {n: m.numel() for n, m in masks.items()}
    total = sum(sizes.values())
    effective_total = sum(effective.values())
    return EffectiveSparsity(
        sizes=sizes, kept=kept, effective_kept=effective, effective_kept_total=effective_total,
        effective_density=effective_total / total if total else 1.0,
        cut_layers=tuple(n for n in masks if effective[n] == 0),
    )


def _gradients_in(dtype: torch.dtype, model: nn.Module, masks: Mapping[str, torch.Tensor],
                  params: dict[str, torch.Tensor], norm_params: dict[str, str], shape: tuple, device: torch.device):
    """The substitutes of `effective_sparsity`'s doc in `dtype`, and the path gradients of the masked ones (in the
    order of `params`)."""
    probes: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for name, p in params.items():
        if name in masks:
            u = torch.rand(p.shape, generator=generator, dtype=torch.float64) + 0.5  # drawn on the CPU: any device
            w = masks[name].to("cpu", torch.float64) * u
            rows = w.reshape(w.shape[0], -1).sum(1) if w.dim() > 1 else w.sum()
            rows = torch.where(rows > 0, rows, 1.0)
            probes[name] = values[name] = (w / rows.reshape(-1, *[1] * (w.dim() - 1))).to(p.device, dtype) \
                .requires_grad_()
        elif name.endswith("bias"):
            values[name] = torch.zeros_like(p, dtype=dtype)
        elif norm_params.get(name) == "weight":
            values[name] = torch.ones_like(p, dtype=dtype)
        else:
            values[name] = p.detach().abs().to(dtype)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            values[name] = torch.zeros_like(b, dtype=dtype)
        elif name.endswith("running_var"):
            values[name] = torch.ones_like(b, dtype=dtype)
        elif b.is_floating_point():
            values[name] = b.to(dtype)
    x = torch.rand((1, *shape), generator=generator, dtype=torch.float64) + 0.5
    return _path_gradients(model, values, probes, x.to(device, dtype), generator)


# max-pool type -> the average pool over the same windows
_AVERAGE_FOR_MAX = {nn.MaxPool1d: F.avg_pool1d, nn.MaxPool2d: F.avg_pool2d, nn.MaxPool3d: F.avg_pool3d}
_ADAPTIVE_AVERAGE_FOR_MAX = {nn.AdaptiveMaxPool1d: F.adaptive_avg_pool1d, nn.AdaptiveMaxPool2d: F.adaptive_avg_pool2d,
                             nn.AdaptiveMaxPool3d: F.adaptive_avg_pool3d}


def _average_instead(module: nn.Module, args: tuple, output):
    """Forward hook: a max-pool's output replaced by the average over the same windows. Max pooling sends
    gradient to each window's argmax only, yet every position of a window is on a path (for some input it is
    the max); an average passes gradient to all of them. Left alone: dilated or index-returning pools."""
    if module.return_indices or not (args and isinstance(args[0], torch.Tensor)):
        return None
    x = torch.nan_to_num(args[0], neginf=0.0)  # onnx2torch pads a MaxPool's asymmetric pads with -inf
    if type(module) in _ADAPTIVE_AVERAGE_FOR_MAX:
        return _ADAPTIVE_AVERAGE_FOR_MAX[type(module)](x, module.output_size)
    dilation = module.dilation if isinstance(module.dilation, tuple | list) else (module.dilation,)
    if any(d != 1 for d in dilation):
        return None
    return _AVERAGE_FOR_MAX[type(module)](x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                          count_include_pad=False)


def _path_gradients(model: nn.Module, values: dict[str, torch.Tensor], probes: dict[str, torch.Tensor],
                    x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor | None, ...]:
    """∂(Σ c·output)/∂probe for each probe, c random positive, in eval mode; the model's modes are restored."""
    modes = [(m, m.training) for m in model.modules()]
    hooks = [m.register_forward_hook(_average_instead) for m in model.modules()
             if type(m) in _AVERAGE_FOR_MAX or type(m) in _ADAPTIVE_AVERAGE_FOR_MAX]
    try:
        model.eval()
        with torch.enable_grad():
            out = functional_call(model, values, (x,), tie_weights=True, strict=False)
            outputs = list(out.values()) if isinstance(out, Mapping) else \
                list(out) if isinstance(out, tuple | list) else [out]
            total = sum((o * (torch.rand(o.shape, generator=generator, dtype=o.dtype) + 0.5).to(o.device)).sum()
                        for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())
            if not probes or not isinstance(total, torch.Tensor) or not total.requires_grad:
                return tuple(None for _ in probes)
            return torch.autograd.grad(total, list(probes.values()), allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
