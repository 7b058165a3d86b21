"""Reshape with allowzero=1 (the dynamo exporter writes it on every Reshape; onnx2torch refuses it):
a 0 in the target then means a zero-sized dimension, which is exactly torch.reshape's meaning."""

from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from stages.onnx_convert.ops import type_only  # noqa: F401  (registers Reshape 19 and 21, wrapped here)
from stages.onnx_convert.ops._base import override


class OnnxReshapeAllowZero(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, torch.Size(shape.tolist()))


def _allow_zero(node, graph, fallback):
    if node.attributes.get("allowzero", 0) == 1:
        return OperationConverterResult(torch_module=OnnxReshapeAllowZero(), onnx_mapping=onnx_mapping_from_node(node))
    return fallback(node, graph)


for _version in (14, 19, 21):
    override("Reshape", _version, _allow_zero)
