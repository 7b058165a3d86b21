"""CastLike (opset 15, types widened at 19 and 21): cast the first input to the second one's dtype."""

from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from stages.onnx_convert.ops._base import register, reject_attributes


class OnnxCastLike(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)


@register("CastLike", 15)
@register("CastLike", 19)
@register("CastLike", 21)
def _convert(node, graph):
    reject_attributes(node, saturate=1)
    return OperationConverterResult(torch_module=OnnxCastLike(), onnx_mapping=onnx_mapping_from_node(node))
