"""Channel handlers of the operators that create channels from a constant weight: Conv/ConvTranspose (depthwise
ones carry their channels through), Gemm and MatMul."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr
from stages.onnx_convert.channels.model import ChannelLayout, ChannelSegment, GroupFix, TensorSlice
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("Conv", "ConvTranspose")
def _conv(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    lay = b.layout(x)
    wd = b.float_initializer_dims(w)
    if wd is None or len(wd) < 3 or b.layout(bias) is not None or (bias and b.float_initializer_dims(bias) is None):
        b.block_inputs(node, f"{node.op_type} whose weight or bias is not a float initializer")
        return
    transposed = node.op_type == "ConvTranspose"
    group = int(attr(node, "group", 1))
    # Conv W: [C_out, C_in/g, k...]; ConvTranspose W: [C_in, C_out/g, k...]
    c_in = wd[0] if transposed else wd[1] * group
    c_out = wd[1] * group if transposed else wd[0]
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    if lay is not None and (lay.axis != 1 or lay.width != c_in):
        b.block(lay, node, f"input channels ({lay.width} on axis {lay.axis}) do not match the weight ({c_in})")
        lay = None
    out = node.output[0]
    if group == 1:
        if lay is not None:
            b.slice_layout(lay, w, in_axis)
        s = b.new_set(c_out, node)
        b.add_slice(s, TensorSlice(w, out_axis))
        if bias:
            b.add_slice(s, TensorSlice(bias, 0, kind="param"))
        b.set_layout(out, ChannelLayout(1, (ChannelSegment(s, c_out),)))
    elif group == c_in and c_out % group == 0:
        # depthwise: output channels c*m .. c*m+m-1 come from input channel c alone; the same channels
        m = c_out // group
        if lay is None:
            return  # its input channels are not tracked, so neither are its outputs
        b.slice_layout(lay, w, 0, scale=1 if transposed else m)
        if bias:
            b.slice_layout(lay, bias, 0, kind="param", scale=m)
        b.group_fixes.append(GroupFix(b.index, w, m, transposed))
        b.set_layout(out, lay.scaled(m))
    else:
        _grouped_conv(b, node, lay, group, transposed)


def _grouped_conv(b: ChannelBuilder, node: onnx.NodeProto, lay: ChannelLayout | None, group: int,
                  transposed: bool) -> None:
    """A grouped Conv/ConvTranspose prunes the same channels in every group, so that `group` stays valid: its
    input channels become `group` runs of the same channels (the sets feeding it are split, see split_set), its
    output channels `group` runs of one new set."""
    w, bias = node.input[1], node.input[2] if len(node.input) > 2 else ""
    wd = b.float_initializer_dims(w)
    out_per_group = wd[1] if transposed else wd[0] // group
    if lay is not None:
        in_per_group = lay.width // group
        runs = ChannelLayout(1, (ChannelSegment(b.new_set(in_per_group), in_per_group),) * group)
        if b.unite(lay, runs):
            lay = b.current(lay)
            if transposed:  # W [C_in, C_out/g, k...]: every input channel has its row
                b.slice_layout(lay, w, 0)
            else:  # W [C_out, C_in/g, k...]: input channel c of each group is column c
                first = ChannelLayout(1, lay.segs[: len(lay.segs) // group])
                b.slice_layout(first, w, 1)
        else:
            b.block(lay, node, f"grouped {node.op_type} (group={group}) over input channels that cannot be split "
                               "into the same channels in every group")
    s = b.new_set(out_per_group, node)
    if transposed:
        b.add_slice(s, TensorSlice(w, 1))
    for g in range(group):
        if not transposed:
            b.add_slice(s, TensorSlice(w, 0, g * out_per_group))
        if bias:
            b.add_slice(s, TensorSlice(bias, 0, g * out_per_group, kind="param"))
    b.set_layout(node.output[0], ChannelLayout(1, (ChannelSegment(s, out_per_group),) * group))


@channel_handler("Gemm")
def _gemm(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    a, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    wd = b.float_initializer_dims(w)
    if wd is None or len(wd) != 2 or b.is_constant(a) or attr(node, "transA", 0):
        b.block_inputs(node, "Gemm without a constant weight B applied to its activation rows")
        return
    trans_b = int(attr(node, "transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    lay = b.layout(a)
    if lay is not None and (lay.axis != 1 or b.rank(a) != 2 or lay.width != wd[k_axis]):
        b.block(lay, node, f"input channels ({lay.width} on axis {lay.axis}) do not match the weight ({wd[k_axis]})")
        lay = None
    if lay is not None:
        b.slice_layout(lay, w, k_axis)
    n = wd[n_axis]
    s = b.new_set(n, node)
    b.add_slice(s, TensorSlice(w, n_axis))
    out_layout = ChannelLayout(1, (ChannelSegment(s, n),))
    if c:
        cd = b.dims(c)
        if b.layout(c) is not None or cd is None:
            b.block(b.layout(c), node, "Gemm's C carries channels")
            b.block(out_layout, node, "Gemm's C carries channels")
        elif cd and cd[-1] == n and n > 1:
            if (len(cd) == 1 or (len(cd) == 2 and cd[0] == 1)) and b.float_initializer_dims(c) is not None:
                b.add_slice(s, TensorSlice(c, len(cd) - 1, kind="param"))
            else:
                b.block(out_layout, node, f"Gemm's C of shape {cd} cannot be sliced per output channel")
    b.set_layout(node.output[0], out_layout)


@channel_handler("MatMul")
def _matmul(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    x, w = node.input[0], node.input[1]
    wd = b.float_initializer_dims(w)
    rx = b.rank(x)
    if wd is None or len(wd) != 2 or b.is_constant(x) or rx is None:
        b.block_inputs(node, "MatMul without a constant 2-D right operand")
        return
    lay = b.layout(x)
    if lay is not None and (lay.axis != rx - 1 or lay.width != wd[0]):
        b.block(lay, node, f"input channels ({lay.width} on axis {lay.axis}) are not the rows of the weight")
        lay = None
    if lay is not None:
        b.slice_layout(lay, w, 0)
    s = b.new_set(wd[1], node)
    b.add_slice(s, TensorSlice(w, 1))
    r = b.rank(node.output[0]) or rx
    b.set_layout(node.output[0], ChannelLayout(r - 1, (ChannelSegment(s, wd[1]),)))
