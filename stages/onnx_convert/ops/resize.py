"""Resize at 18 (antialias, axes, keep_aspect_ratio_policy) and 19 (half_pixel_symmetric): the
opset-13 converter applies when those keep their defaults."""

from __future__ import annotations

from stages.onnx_convert.ops._base import previous, register, reject_attributes


@register("Resize", 18)
@register("Resize", 19)
def _convert(node, graph):
    reject_attributes(node, antialias=0, axes=None, keep_aspect_ratio_policy="stretch")
    if node.attributes.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        raise NotImplementedError("coordinate_transformation_mode='half_pixel_symmetric' is not supported")
    return previous("Resize", 13)(node, graph)
