"""Channel handlers of Pad and Resize/Upsample: fine unless they pad or scale the channel axis."""

from __future__ import annotations

import numpy as np
import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, nonneg_axis
from stages.onnx_convert.channels.handlers._common import layout_rank
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("Pad")
def _pad(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return
    pads = attr(node, "pads") if b.opset < 11 else b.ints(node.input[1]) if len(node.input) > 1 else None
    axes = b.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None or r is None or (len(node.input) > 3 and node.input[3] and axes is None):
        b.block(lay, node, "Pad amounts computed at run time")
        return
    axes = list(range(r)) if axes is None else [nonneg_axis(a, r) for a in axes]
    n = len(axes)
    if lay.axis in axes:
        i = axes.index(lay.axis)
        if pads[i] or pads[i + n]:
            b.block(lay, node, "pads the channel axis")
            return
    b.set_layout(node.output[0], lay)


@channel_handler("Resize", "Upsample")
def _resize(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    found = layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    axes = [nonneg_axis(a, r) for a in attr(node, "axes", list(range(r)))]
    if lay.axis not in axes:
        b.set_layout(node.output[0], lay)
        return
    i = axes.index(lay.axis)
    scales_name = node.input[1] if node.op_type == "Upsample" or b.opset < 11 else (
        node.input[2] if len(node.input) > 2 else "")
    sizes = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
    scales = attr(node, "scales") or (b.const(scales_name) if scales_name else None)
    if sizes:
        b.block(lay, node, "Resize 'sizes' spells out the channel count")
        return
    if scales is None or len(scales) != len(axes) or float(np.asarray(scales)[i]) != 1.0:
        b.block(lay, node, f"{node.op_type} scales the channel axis (or its scales are computed at run time)")
        return
    b.set_layout(node.output[0], lay)
