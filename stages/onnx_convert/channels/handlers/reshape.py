"""Channel handlers of Flatten and Reshape: the dimensions after the channel axis may merge into it (H*W entries
per channel into a Gemm); a Reshape target that spells out the channel count is rewritten by the cut."""

from __future__ import annotations

import math

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder, attr, known, nonneg_axis
from stages.onnx_convert.channels.model import ChannelLayout
from stages.onnx_convert.channels.registry import channel_handler


@channel_handler("Flatten")
def _flatten(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    lay, d = b.layout(node.input[0]), b.dims(node.input[0])
    if lay is None:
        return
    if d is None:
        b.block(lay, node, "shape unknown to shape inference")
        return
    axis = nonneg_axis(int(attr(node, "axis", 1)), len(d))
    between, after = d[axis:lay.axis], d[lay.axis + 1:]
    if lay.axis < axis or not all(known(x) for x in between + after) or math.prod(between) != 1:
        b.block(lay, node, f"Flatten at axis {axis} of a {list(d)} tensor scatters each channel")
        return
    b.set_layout(node.output[0], ChannelLayout(1, lay.scaled(math.prod(after)).segs))


@channel_handler("Reshape")
def _reshape(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    """A Reshape that keeps the dimensions before the channel axis and merges the ones after it into it
    (into a Gemm: H*W entries per channel), or leaves the channel axis alone. Anything that splits the
    channel axis (a channel shuffle) is blocked."""
    lay = b.layout(node.input[0])
    if lay is None:
        return
    din, dout = b.dims(node.input[0]), b.dims(node.output[0])
    c = lay.axis
    allowzero = int(attr(node, "allowzero", 0))
    target = b.ints(node.input[1])
    pieces = [("int", v) for v in target] if target is not None else _target_pieces(b, node.input[1])
    if din is None or pieces is None:
        b.block(lay, node, "Reshape target computed at run time" if din is not None else "shape unknown")
        return
    entry = pieces[c] if c < len(pieces) else ("?", None)
    if dout is None or len(dout) <= c or not known(dout[c]):
        # `x.view(x.size(0), -1)`: inference leaves the -1 open when the batch is symbolic; the target keeps
        # the dimensions before the channel axis and merges the rest into it
        def same(i: int, p: tuple) -> bool:
            if p[0] == "dim":  # dimension i of a tensor whose dimension i is the input's
                source = b.dims(p[1][1])
                return p[1][0] == i and source is not None and len(source) > i and source[i] == din[i]
            return p == ("int", din[i]) or (p == ("int", 0) and not allowzero)

        keeps_prefix = len(pieces) == c + 1 and all(same(i, p) for i, p in enumerate(pieces[:c]))
        if keeps_prefix and entry == ("int", -1) and all(known(x) for x in din[c:]):
            dout = (*din[:c], math.prod(din[c:]))
    # Channel ch of the input occupies entries [ch*factor, (ch+1)*factor) of output axis c when the dims after
    # the channel axis merge into it: dout[c] = factor*C and prod(din[c+1:]) = factor*prod(dout[c+1:]) (then
    # the dims before it hold as many entries on both sides, whatever the batch size).
    after_in, after_out = din[c + 1:], (dout or ())[c + 1:]
    if dout is not None and len(dout) > c and known(dout[c]) and dout[c] < lay.width:
        b.block(lay, node, f"Reshape {list(din)} -> {list(dout)} splits the channel axis (a channel shuffle?)")
        return
    if dout is None or len(dout) <= c or not known(dout[c]) or not all(known(x) for x in after_in + after_out):
        b.block(lay, node, f"Reshape {list(din)} -> {list(dout or ())} moves the channel axis")
        return
    factor, rest = divmod(int(dout[c]), lay.width)
    if rest or factor == 0 or math.prod(after_in) != factor * math.prod(after_out):
        b.block(lay, node, f"Reshape {list(din)} -> {list(dout)} splits the channel axis (a channel shuffle?)")
        return
    if entry == ("int", -1) or (entry == ("int", 0) and not allowzero and factor == 1):
        pass  # follows the cut by itself
    elif entry == ("int", int(dout[c])) and target is not None:
        b.reshapes.append((b.index, c, lay.scaled(factor)))
    else:
        b.block(lay, node, "the Reshape target spells out the channel count where it cannot be rewritten")
        return
    b.set_layout(node.output[0], lay.scaled(factor))


def _target_pieces(b: ChannelBuilder, name: str) -> list[tuple[str, object]] | None:
    """A Reshape target built at run time as a Concat of one-element pieces, entry by entry: ("int", v) for a
    constant, ("dim", (i, tensor)) for dimension i of a tensor read with Shape -> Gather (-> Unsqueeze/Cast),
    ("?", None) otherwise. `x.view(x.size(0), -1)` exports as Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])."""
    producer = b.producers.get(name)
    if producer is None or producer.op_type != "Concat" or int(attr(producer, "axis", 0)) != 0:
        return None
    pieces: list[tuple[str, object]] = []
    for piece in producer.input:
        ints = b.ints(piece)
        if ints is not None:
            pieces += [("int", v) for v in ints]
            continue
        d = b.dims(piece)
        if d is None or len(d) != 1 or d[0] != 1:
            return None
        pieces.append(_shape_dim(b, piece))
    return pieces


def _shape_dim(b: ChannelBuilder, name: str) -> tuple[str, object]:
    node = b.producers.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        node = b.producers.get(node.input[0])
    if node is not None and node.op_type == "Gather" and int(attr(node, "axis", 0)) == 0:
        shape = b.producers.get(node.input[0])
        index = b.ints(node.input[1])
        if shape is not None and shape.op_type == "Shape" and index is not None and len(index) == 1 \
                and attr(shape, "start") is None and index[0] >= 0:
            return ("dim", (index[0], shape.input[0]))
    return ("?", None)
