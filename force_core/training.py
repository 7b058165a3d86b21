"""Masked-parameter helpers used by sparse training: keep pruned weights (and their optimizer state) at zero.

One fused `torch._foreach_mul_` over cached float masks after each optimizer step. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class MaskEnforcer:
    """Holds `masks` on `model` (a module, or a mapping name -> parameter) during training.

    Usage::

        enforcer = MaskEnforcer(model, masks, grad_hook=True)
        enforcer.apply_()                      # zero pruned weights once before training
        for x, y in loader:
            loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
            enforcer.after_step(optimizer)     # weights (and optimizer state) back to zero

    `grad_hook=True` also zeroes the gradients of pruned entries during backward, so momentum and
    Adam moments of pruned weights stay zero by construction.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        *,
        grad_hook: bool = False,
    ):
        named = (
            dict(model_or_params.named_parameters())
            if isinstance(model_or_params, nn.Module)
            else dict(model_or_params)
        )
        missing = [n for n in masks if n not in named]
        if missing:
            raise ValueError(f"masked parameters not found: {missing[:5]}")
        self.names = list(masks)
        self.params = [named[n] for n in self.names]
        self.masks: list[torch.Tensor] = []
        for n, p in zip(self.names, self.params, strict=True):
            m = masks[n]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
            self.masks.append(m.to(device=p.device, dtype=p.dtype))  # float 0/1: cheaper than a bool multiply
        self._hooks = []
        if grad_hook:
            self._hooks = [p.register_hook(lambda g, m=m: g * m) for p, m in zip(self.params, self.masks, strict=True)]

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned weights in place (one fused call; nothing to do for an empty mask set)."""
        if self.params:
            torch._foreach_mul_([p.data for p in self.params], self.masks)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer state (SGD momentum, Adam moments) of pruned entries."""
        tensors, masks = [], []
        for p, m in zip(self.params, self.masks, strict=True):
            state = optimizer.state.get(p, {})
            for key in _STATE_KEYS:
                s = state.get(key)
                if isinstance(s, torch.Tensor) and s.shape == m.shape:
                    tensors.append(s)
                    masks.append(m if s.dtype == m.dtype else m.to(s.dtype))
        if tensors:
            torch._foreach_mul_(tensors, masks)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after every `optimizer.step()`: weights, and the optimizer's state when given."""
        self.apply_()
        if optimizer is not None:
            self.mask_optimizer_state_(optimizer)

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def apply_masks_(model_or_params: nn.Module | Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero pruned weights in place. In a training loop keep one `MaskEnforcer` (cached masks) instead."""
    MaskEnforcer(model_or_params, masks).apply_()
