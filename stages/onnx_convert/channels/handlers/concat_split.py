"""Channel handlers of Concat (channel runs laid end to end, or united along another axis), Split and Slice
(blocked when they cut the channel axis)."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, known, nonneg_axis
from stages.onnx_convert.channels.model import ChannelLayout, ChannelSegment
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("Concat")
def _concat(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    inputs = [n for n in node.input if n]
    tracked = [b.layout(n) for n in inputs if b.layout(n) is not None]
    if not tracked:
        return
    r = b.rank(node.output[0]) or b.rank(inputs[0])
    if r is None:
        b.block_inputs(node, "rank unknown to shape inference")
        return
    axis = nonneg_axis(int(attr(node, "axis", 1)), r)
    if any(lay.axis == axis for lay in tracked):  # along the channels: the layouts are laid end to end
        segs: list[ChannelSegment] = []
        for n in inputs:
            lay = b.layout(n)
            if lay is not None and lay.axis != axis:
                b.block(lay, node, "concatenates channels on different axes")
                lay = None
            if lay is None:
                d = b.dims(n)
                width = d[axis] if d is not None and len(d) == r else None
                if not known(width):
                    b.block_inputs(node, f"concatenates '{n}', whose channel count is unknown")
                    return
                lay = b.opaque(node, "", axis, int(width), f"concatenates '{n}', whose channels the analysis "
                                                           "cannot follow")
            segs += lay.segs
        b.set_layout(node.output[0], ChannelLayout(axis, tuple(segs)))
        return
    # along another axis (batch, space): the inputs' channels are the same channels
    lays = [b.layout(n) for n in inputs]
    if any(lay is None for lay in lays) or any(not b.unite(lays[0], lay) for lay in lays[1:]):
        b.block_inputs(node, "concatenates along another axis tensors whose channels differ")
        return
    b.set_layout(node.output[0], lays[0])


@channel_handler("Slice")
def _slice(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    lay, d = b.layout(node.input[0]), b.dims(node.input[0])
    if lay is None:
        return
    if b.opset < 10:
        starts, ends, axes = attr(node, "starts"), attr(node, "ends"), attr(node, "axes")
        steps = None
    else:
        starts, ends = b.ints(node.input[1]), b.ints(node.input[2])
        axes = b.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = b.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if (len(node.input) > 3 and node.input[3] and axes is None) or (
                len(node.input) > 4 and node.input[4] and steps is None):
            b.block(lay, node, "Slice axes or steps computed at run time")
            return
    if d is None:
        b.block(lay, node, "rank unknown to shape inference")
        return
    axes = list(range(len(starts or ()))) if axes is None else [nonneg_axis(a, len(d)) for a in axes]
    if lay.axis in axes:
        i = axes.index(lay.axis)
        whole = (starts is not None and ends is not None and starts[i] in (0, -(2**63))
                 and ends[i] >= lay.width and (steps is None or steps[i] == 1))
        if not whole:
            b.block(lay, node, "slices the channel axis")
            return
    b.set_layout(node.output[0], lay)


@channel_handler("Split")
def _split(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return
    if r is None or nonneg_axis(int(attr(node, "axis", 0)), r) == lay.axis:
        b.block(lay, node, "splits the channel axis")
        return
    for out in node.output:
        b.set_layout(out, lay)
