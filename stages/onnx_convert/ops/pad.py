"""Pad at 18 (optional `axes` input), 19 (`wrap` mode) and 21 (types): the opset-13 converter applies
when every axis is padded and the mode is one PyTorch has."""

from __future__ import annotations

from stages.onnx_convert.ops._base import previous, register


@register("Pad", 18)
@register("Pad", 19)
@register("Pad", 21)
def _convert(node, graph):
    if len(node.input_values) > 3 and node.input_values[3]:
        raise NotImplementedError("the 'axes' input is not supported (pad every axis instead)")
    if node.attributes.get("mode", "constant") == "wrap":
        raise NotImplementedError("mode='wrap' is not supported")
    return previous("Pad", 13)(node, graph)
