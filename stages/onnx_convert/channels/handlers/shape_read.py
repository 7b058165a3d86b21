"""Channel handler of Shape: reading the shape is fine unless the channel count is read."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, node_name, nonneg_axis
from stages.onnx_convert.channels.handlers._common import layout_rank
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("Shape")
def _shape(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    """Reading the shape is fine unless the channel count is read: Gather/Slice of other dimensions only."""
    found = layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    start = nonneg_axis(int(attr(node, "start", 0)), r)
    end = attr(node, "end")
    end = r if end is None else min(nonneg_axis(int(end), r), r)
    if not start <= lay.axis < end:
        return
    pos = lay.axis - start
    for k, i in b.uses.get(node.output[0], []):
        user = b.graph.node[k]
        if user.op_type == "Gather" and i == 0 and int(attr(user, "axis", 0)) == 0:
            idx = b.ints(user.input[1])
            if idx is not None and pos not in [nonneg_axis(j, end - start) for j in idx]:
                continue
        elif user.op_type == "Slice" and i == 0 and b.opset >= 10:
            s, e = b.ints(user.input[1]), b.ints(user.input[2])
            if s is not None and e is not None and len(s) == 1 and len(user.input) <= 3:
                lo, hi = nonneg_axis(s[0], end - start), e[0] if e[0] >= 0 else e[0] + end - start
                if not lo <= pos < hi:
                    continue
        b.block(lay, node, f"reads the channel count (Shape -> {user.op_type} '{node_name(user)}')")
        return
