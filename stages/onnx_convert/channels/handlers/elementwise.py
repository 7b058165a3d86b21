"""Channel handlers of element-wise operators: activations and pools, channel by channel (`UNARY`), and the
binary/variadic ones (Add, Mul, ...) that unite the channels of their inputs or slice a per-channel constant."""

from __future__ import annotations

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder
from stages.onnx_convert.channels.registry import channel_handler
from stages.onnx_convert.passes._graph import FLOAT_TYPES

UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
         "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Neg", "Abs", "Exp", "Sqrt", "Sin", "Cos", "Floor",
         "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "MaxPool", "AveragePool", "GlobalAveragePool",
         "GlobalMaxPool", "LpPool", "GlobalLpPool")


@channel_handler(*UNARY)
def _unary(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    """Channel by channel (activations, pools): the layout passes through; finite at 0, so a masked channel
    stays harmless. Extra inputs (Clip's bounds, Dropout's ratio) must not carry channels."""
    b.block_inputs(node, f"{node.op_type} takes channels as a parameter input", node.input[1:])
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] and node.output[1] in b.uses:
        b.block(b.layout(node.input[0]), node, "MaxPool indices depend on the channel count")
        return
    b.set_layout(node.output[0], b.layout(node.input[0]))


_PARAM_KIND = {"Add": "param", "Sub": "param", "Mul": "param", "PRelu": "param", "Div": "stat", "Max": "stat",
               "Min": "stat", "Sum": "param", "Mean": "param"}


@channel_handler("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu")
def _elementwise(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    """Residual Add, SE Mul, a bias after MatMul: tensors with channels unite; a per-channel constant is
    sliced with them ("param", or "stat" for a divisor or bound, which masking must not zero)."""
    out = node.output[0]
    inputs = [n for n in node.input if n]
    ranks = [b.rank(n) for n in inputs]
    r = b.rank(out)
    if r is None and None not in ranks:
        r = max(ranks)
    tracked = [(n, b.layout(n)) for n in inputs if b.layout(n) is not None]
    if not tracked:
        return
    if r is None or None in ranks:
        b.block_inputs(node, "shapes unknown to shape inference")
        return
    # the channel axis, counted in the output's rank (broadcasting aligns from the end)
    axes = {lay.axis + r - b.rank(n) for n, lay in tracked}
    if len(axes) != 1:
        b.block_inputs(node, "combines tensors whose channels lie on different axes")
        return
    axis = axes.pop()
    width = max(lay.width for _, lay in tracked)
    main = next(lay for _, lay in tracked if lay.width == width)
    b.set_layout(out, main.moved(axis))  # blocked or not, these are the output's channels
    if node.op_type == "Div" and b.layout(node.input[1]) is not None:
        b.block_inputs(node, "divides by channels (a masked channel would divide by zero)")
        return
    for _, lay in tracked:
        if lay.width == 1 and width > 1:
            continue  # a single-channel map broadcast over all channels: nothing to prune there
        if lay is not main and not b.unite(main, lay):
            b.block_inputs(node, "combines channels laid out differently (e.g. a Concat with a single tensor)")
            return
    for n, rank in zip(inputs, ranks, strict=True):
        if b.layout(n) is not None:
            continue
        d = b.dims(n)
        pos = axis - (r - rank)
        here = d[pos] if 0 <= pos < len(d) else 1
        if here == 1:
            continue  # broadcast along the channels
        if here == width and n in b.inits and b.inits[n].data_type in FLOAT_TYPES:
            b.slice_layout(main, n, pos, kind=_PARAM_KIND[node.op_type])
            continue
        why = ("a per-channel constant held in a Constant node" if b.is_constant(n)
               else f"'{n}', whose channels the analysis cannot follow")
        b.block(main, node, f"combines the channels with {why}")
        return
