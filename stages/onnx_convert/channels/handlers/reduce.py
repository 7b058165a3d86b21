"""Channel handlers of the Reduce* operators: fine over other axes, blocked over the channel axis."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, nonneg_axis
from stages.onnx_convert.channels.handlers._common import layout_axes_dims
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
                 "ReduceSumSquare")
def _reduce(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    found = layout_axes_dims(b, node)
    if found is None:
        return
    lay, axes, d = found
    if axes is None or not axes:
        if attr(node, "noop_with_empty_axes", 0):
            b.set_layout(node.output[0], lay)
        else:
            b.block(lay, node, f"{node.op_type} over all axes mixes the channels")
        return
    axes = [nonneg_axis(a, len(d)) for a in axes]
    if lay.axis in axes:
        b.block(lay, node, f"{node.op_type} over the channel axis mixes the channels")
        return
    keep = int(attr(node, "keepdims", 1))
    b.set_layout(node.output[0], lay.moved(lay.axis - (0 if keep else sum(a < lay.axis for a in axes))))
