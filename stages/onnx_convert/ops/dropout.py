"""Dropout with its optional `mask` output (opset 9 models write it): onnx2torch returns only the data
and then indexes it as if it were the (data, mask) pair, dropping the batch dimension. Dropout-7 (the
version opset 9 uses) is registered here too."""

from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from stages.onnx_convert.ops._base import override, previous, register


class OnnxDropoutWithMask(nn.Module, OnnxToTorchModule):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor, *unused) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training or self.ratio == 0.0:
            return x, torch.ones_like(x, dtype=torch.bool)
        keep = torch.rand_like(x) >= self.ratio
        return x * keep / (1.0 - self.ratio), keep


def _with_mask(node, graph, fallback):
    if len(node.output_values) > 1 and node.output_values[1]:
        ratio = float(node.attributes.get("ratio", 0.5))
        if len(node.input_values) > 1 and node.input_values[1]:
            raise NotImplementedError("a ratio input together with the mask output is not supported")
        return OperationConverterResult(torch_module=OnnxDropoutWithMask(ratio),
                                        onnx_mapping=onnx_mapping_from_node(node))
    return fallback(node, graph)


@register("Dropout", 7)
def _dropout7(node, graph):
    return _with_mask(node, graph, previous("Dropout", 10))


for _version in (10, 12, 13):
    override("Dropout", _version, _with_mask)

