"""Size (the element count as an int64 scalar; timm's sam2_hiera) and OneHot (timm's gcvit builds relative position
indices with it): onnx2torch has no converter for either."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from stages.onnx_convert.ops._base import register


class OnnxSize(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


class OnnxOneHot(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        d = int(depth.reshape(-1)[0])
        idx = indices.long()
        idx = torch.where(idx < 0, idx + d, idx)  # -1 is the last class; outside [-d, d) is all "off"
        inside = (idx >= 0) & (idx < d)
        hot = F.one_hot(idx.clamp(0, d - 1), d) * inside.unsqueeze(-1)
        out = values[0] + (values[1] - values[0]) * hot.to(values.dtype)
        return out.movedim(-1, self.axis if self.axis >= 0 else self.axis + out.dim())


@register("Size", 1)
@register("Size", 13)
@register("Size", 19)
@register("Size", 21)
def _size(node, graph):
    return OperationConverterResult(torch_module=OnnxSize(), onnx_mapping=onnx_mapping_from_node(node))


@register("OneHot", 9)
@register("OneHot", 11)
def _one_hot(node, graph):
    return OperationConverterResult(torch_module=OnnxOneHot(int(node.attributes.get("axis", -1))),
                                    onnx_mapping=onnx_mapping_from_node(node))
