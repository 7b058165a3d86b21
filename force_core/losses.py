"""The classification loss of a network's output as what it is: logits, probabilities (a final Softmax) or
log-probabilities (a final LogSoftmax). Cross-entropy on probabilities would apply a second softmax and flatten the
gradient, for the mask scores as for training."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _nll_of_probabilities(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.nll_loss(torch.log(p.clamp_min(1e-12)), y, reduction=reduction)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "logits": F.cross_entropy, "softmax": _nll_of_probabilities, "log_softmax": F.nll_loss}
