"""Reduce* at opset 18 (and ReduceMax/ReduceMin at 20): `axes` moved from an attribute to an input."""

from __future__ import annotations

from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

from stages.onnx_convert.ops._base import register

_OPS = ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSumSquare"]


def _convert(node, graph) -> OperationConverterResult:
    keepdims = node.attributes.get("keepdims", 1)
    noop = node.attributes.get("noop_with_empty_axes", 0)
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).reshape(-1).tolist()]
        except KeyError:
            raise NotImplementedError("axes computed at run time are not supported (only constant axes)") from None
    if not axes and noop:
        raise NotImplementedError("noop_with_empty_axes=1 with empty axes is not supported")
    return OperationConverterResult(
        torch_module=OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes or None, keepdims=keepdims),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


for _op in _OPS:
    register(_op, 18)(_convert)
register("ReduceMax", 20)(_convert)
register("ReduceMin", 20)(_convert)
