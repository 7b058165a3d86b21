"""Helpers several handler families share: the layout and rank of a node's first input, and `axes` given as an
attribute or an input."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr


def layout_rank(b: ChannelBuilder, node: onnx.NodeProto):
    """(layout, rank) of the node's first input; None when it carries no channels, or when shape inference gave
    it no rank (then the channels are blocked here)."""
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return None
    if r is None:
        b.block(lay, node, "rank unknown to shape inference")
        return None
    return lay, r


def node_axes(b: ChannelBuilder, node: onnx.NodeProto, input_index: int) -> list[int] | None:
    """`axes` as an attribute (older opsets) or an input (newer); None: not given; raises LookupError when
    it is an input that is not constant."""
    value = attr(node, "axes")
    if value is not None:
        return [int(a) for a in value]
    if len(node.input) > input_index and node.input[input_index]:
        ints = b.ints(node.input[input_index])
        if ints is None:
            raise LookupError("axes computed at run time")
        return ints
    return None


def layout_axes_dims(b: ChannelBuilder, node: onnx.NodeProto):
    """(layout, axes, dims) of a node with `axes` as attribute or input 1; None (blocking it where it carries
    channels) when its input has no channels, its axes are computed at run time or its rank is unknown."""
    lay, d = b.layout(node.input[0]), b.dims(node.input[0])
    if lay is None:
        return None
    try:
        axes = node_axes(b, node, 1)
    except LookupError as e:
        b.block(lay, node, str(e))
        return None
    if d is None:
        b.block(lay, node, "rank unknown to shape inference")
        return None
    return lay, axes, d
