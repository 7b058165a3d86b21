"""When a masked network no longer depends on its input: its outputs over a batch have stopped spreading. The loss
then sits at the uniform-prediction value, every gradient upstream of the cut is (nearly) zero and a selection
picks among ties. Shared by the weight methods (engine) and the channel methods (channels)."""

from __future__ import annotations

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
