"""Split at 18: new `num_outputs` attribute. Without a `split` input the chunks are ceil(length / num_outputs)
long and the last one takes what is left, possibly less (onnx.defs Split-18); onnx2torch's equal split
divides with floor and drops or adds a chunk when the length is not a multiple. Sizes from the `split`
input keep the opset-13 converter."""

from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

from stages.onnx_convert.ops._base import previous, register


class OnnxSplitChunks(nn.Module, OnnxToTorchModule):
    def __init__(self, num_outputs: int, axis: int):
        super().__init__()
        self.num_outputs, self.axis = num_outputs, axis

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = x.shape[self.axis]
        chunk = -(-length // self.num_outputs)
        sizes = [chunk] * (self.num_outputs - 1)
        return torch.split(x, [*sizes, length - sum(sizes)], dim=self.axis)


@register("Split", 18)
def _convert(node, graph):
    n = node.attributes.get("num_outputs")
    if len(node.input_values) > 1 and node.input_values[1]:
        return previous("Split", 13)(node, graph)
    if n is not None and n != len(node.output_values):
        raise NotImplementedError(f"num_outputs={n} differs from the {len(node.output_values)} outputs")
    return OperationConverterResult(
        torch_module=OnnxSplitChunks(len(node.output_values), node.attributes.get("axis", 0)),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))
