"""Gelu (new in opset 20; the legacy exporter writes it for nn.GELU at opset >= 20)."""

from __future__ import annotations

from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
from torch import nn

from stages.onnx_convert.ops._base import register


@register("Gelu", 20)
def _convert(node, graph):
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"approximate={approximate!r} is not supported")
    return OperationConverterResult(torch_module=nn.GELU(approximate=approximate),
                                    onnx_mapping=onnx_mapping_from_node(node))
