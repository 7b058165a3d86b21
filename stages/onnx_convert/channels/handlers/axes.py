"""Channel handlers of the operators that move the channel axis: Transpose, Squeeze and Unsqueeze."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, nonneg_axis
from stages.onnx_convert.channels.handlers._common import layout_axes_dims, layout_rank
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("Transpose")
def _transpose(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    found = layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    perm = [nonneg_axis(int(p), r) for p in attr(node, "perm", list(range(r))[::-1])]
    b.set_layout(node.output[0], lay.moved(perm.index(lay.axis)))


@channel_handler("Squeeze", "Unsqueeze")
def _squeeze(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    found = layout_axes_dims(b, node)
    if found is None:
        return
    lay, axes, d = found
    c = lay.axis
    if node.op_type == "Squeeze":
        axes = [i for i, x in enumerate(d) if x == 1] if axes is None else [nonneg_axis(a, len(d)) for a in axes]
        if c in axes:
            b.block(lay, node, "squeezes the channel axis away")
            return
        c -= sum(a < c for a in axes)
    else:
        for a in sorted(nonneg_axis(a, len(d) + len(axes or ())) for a in axes or ()):
            c += a <= c
    b.set_layout(node.output[0], lay.moved(c))
