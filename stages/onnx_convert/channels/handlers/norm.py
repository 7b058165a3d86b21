"""Channel handlers of the normalisations: BatchNormalization/InstanceNormalization (per-channel parameters and
statistics), LayerNormalization (sliced when it normalises over the channels alone, blocked over more axes) and
Softmax/LogSoftmax/Hardmax (blocked when they normalise across channels)."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, nonneg_axis
from stages.onnx_convert.channels.handlers._common import layout_rank
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("BatchNormalization", "InstanceNormalization")
def _norm(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    lay = b.layout(node.input[0])
    kinds = ("param", "param", "stat", "stat")
    params = [n for n in node.input[1:5] if n]
    if lay is None:
        return
    if lay.axis != 1 or any(b.float_initializer_dims(p) != (lay.width,) for p in params):
        b.block(lay, node, f"{node.op_type} parameters do not match the {lay.width} channels on axis 1")
        return
    for p, kind in zip(params, kinds, strict=False):
        b.slice_layout(lay, p, 0, kind=kind)
    b.set_layout(node.output[0], lay)


@channel_handler("LayerNormalization")
def _layer_norm(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    """Over the channel axis alone (the last), its scale and bias are sliced with the channels and the cut model
    normalises over the kept ones (recorded in `b.norms` for the masked reference); over more axes, blocked."""
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return
    params = [n for n in node.input[1:3] if n]
    if r is None:
        b.block(lay, node, "rank unknown to shape inference")
    elif lay.axis < nonneg_axis(int(attr(node, "axis", -1)), r):
        pass  # normalises within each channel's entries: the channels pass through
    elif lay.axis == r - 1 == nonneg_axis(int(attr(node, "axis", -1)), r) and all(
            b.float_initializer_dims(p) == (lay.width,) for p in params):
        for p in params:
            b.slice_layout(lay, p, 0, kind="param")
        b.norms.append((b.index, lay))
    else:
        b.block(lay, node, "LayerNormalization normalises across the channels and other axes")
    b.set_layout(node.output[0], lay)  # blocked or not, the same channels come out


@channel_handler("Softmax", "LogSoftmax", "Hardmax")
def _softmax(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    found = layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    axis = nonneg_axis(int(attr(node, "axis", -1 if b.opset >= 13 else 1)), r)
    mixes = lay.axis == axis if b.opset >= 13 else lay.axis >= axis
    if mixes:
        b.block(lay, node, f"{node.op_type} normalises across the channels")
    b.set_layout(node.output[0], lay)
