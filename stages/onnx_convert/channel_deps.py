"""Channel dependency analysis on the normalised ONNX graph (DepGraph's build/group/check on ONNX): which
output channels must be pruned together, and which slices of which initializers they own.

Imports onnx and numpy only; never torch, force_core, flows, prefect or click.

How it works: every activation tensor that carries channels gets a *layout*, the channel axis and the run of
channel sets laid end to end along it (one set, or several after a Concat; `block` entries per channel after a
Flatten). A Conv/ConvTranspose/Gemm/MatMul with a constant weight starts a new set; the handler of each
operator (one small function per operator type in `HANDLERS`, see `channel_handler`) says how the layout goes
from its inputs to its outputs and which initializer slices it owns. Operators that force channels to be the
same (residual Add, SE Mul, tied weights) unite their sets; an operator no handler understands blocks every
set that flows into it. A blocked set is never pruned; the rest, with at least one prunable weight, are the
groups.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import FLOAT_TYPES, constant_value, real_inputs

__all__ = ["Blocked", "ChannelAnalysis", "ChannelGroup", "HANDLERS", "Plan", "TensorSlice", "analyze",
           "analyze_channels", "channel_handler"]


@dataclass(frozen=True)
class TensorSlice:
    initializer: str
    axis: int
    offset: int = 0  # entries along axis before channel 0 of the group (Concat offsets)
    block: int = 1  # entries per channel along axis (Flatten/Reshape into Gemm/MatMul: H*W)
    kind: str = "weight"  # "weight": a prunable weight (a slot in PRUNABLE_SLOTS); "param": other trained values
    # (bias, norm scale/shift, ...), zeroed when masking; "stat": running mean/var and other values that are
    # sliced by the cut but never zeroed
    # channel c covers entries [offset + c*block, offset + (c+1)*block) along axis


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # the output tensor name of its first producer (graph order)
    size: int
    slices: tuple[TensorSlice, ...]
    producers: tuple[str, ...]  # names of the nodes (Conv/ConvTranspose/Gemm/MatMul) that create these channels


@dataclass(frozen=True)
class Blocked:
    node: str
    op_type: str
    reason: str  # a node whose channels are never pruned, and why


@dataclass(frozen=True)
class ChannelAnalysis:
    groups: tuple[ChannelGroup, ...]
    blocked: tuple[Blocked, ...]

    def describe(self) -> str:
        """The groups and blocked nodes, one line each, for a person to read what moves together."""
        lines = [f"{len(self.groups)} channel groups, {sum(g.size for g in self.groups)} channels"]
        for g in self.groups:
            parts = ", ".join(f"{s.initializer}[{s.axis}]" + (f"@{s.offset}" if s.offset else "")
                              + (f"x{s.block}" if s.block != 1 else "") + ("" if s.kind == "weight" else f" ({s.kind})")
                              for s in g.slices)
            lines.append(f"  {g.name}: {g.size} channels; {parts}")
        lines += [f"  blocked {b.node} ({b.op_type}): {b.reason}" for b in self.blocked]
        return "\n".join(lines)


# --- internal layout --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Seg:
    set: int  # channel-set id (union-find)
    size: int  # channels
    block: int = 1  # entries per channel along the axis


@dataclass(frozen=True)
class _Layout:
    axis: int  # non-negative axis of the tensor that indexes the channels
    segs: tuple[_Seg, ...]

    @property
    def width(self) -> int:
        return sum(s.size * s.block for s in self.segs)

    def scaled(self, factor: int) -> _Layout:
        return _Layout(self.axis, tuple(_Seg(s.set, s.size, s.block * factor) for s in self.segs))

    def moved(self, axis: int) -> _Layout:
        return _Layout(axis, self.segs)


@dataclass(frozen=True)
class ReshapeFix:
    """A Reshape whose constant target spells out the channel axis: entry `position` becomes the kept count."""

    node_index: int
    position: int
    segs: tuple[tuple[str | None, int, int], ...]  # (group name or None when never cut, channels, block)


@dataclass(frozen=True)
class GroupFix:
    """A depthwise Conv/ConvTranspose whose `group` attribute follows the kept channels."""

    node_index: int
    weight: str
    multiplier: int  # output channels per input channel
    transposed: bool


@dataclass(frozen=True)
class Plan:
    """Everything the surgery needs beyond the groups; `analyze` computes it from the same graph."""

    analysis: ChannelAnalysis
    tensor_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tensor -> groups in its layout
    reshapes: tuple[ReshapeFix, ...] = ()
    group_fixes: tuple[GroupFix, ...] = ()


class _Sets:
    """Union-find over channel sets; a set created earlier is the root of a union (deterministic names)."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.creators: list[list[int]] = []  # node indices that create the set

    def new(self, size: int, creator: int | None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.creators.append([] if creator is None else [creator])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ra, rb = min(ra, rb), max(ra, rb)
        assert self.size[ra] == self.size[rb], "callers unite sets of equal size only"
        self.parent[rb] = ra
        self.creators[ra] += self.creators[rb]
        return ra


Handler = Callable[["_Builder", onnx.NodeProto], None]
HANDLERS: dict[str, Handler] = {}


def channel_handler(*op_types: str) -> Callable[[Handler], Handler]:
    """Register `fn(builder, node)` as the channel handler of `op_types` (domain ''): it reads the layouts of
    the node's inputs (`builder.layout(name)`), sets those of its outputs (`builder.set_layout`), records the
    initializer slices the channels own (`builder.slice_layout`) and unites or blocks sets. An operator with
    no handler blocks every channel that reaches it."""

    def register(fn: Handler) -> Handler:
        for op in op_types:
            HANDLERS[op] = fn
        return fn

    return register


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.constants = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant" and n.output}
        self.producers = {o: n for n in self.graph.node for o in n.output if o}
        self.uses: dict[str, list[tuple[int, int]]] = {}
        for k, node in enumerate(self.graph.node):
            for i, name in enumerate(node.input):
                if name:
                    self.uses.setdefault(name, []).append((k, i))
        self.shapes = _infer_shapes(model)
        self.sets = _Sets()
        self.layouts: dict[str, _Layout] = {}
        self.slices: list[tuple[int, TensorSlice, int]] = []  # (set, slice, node index)
        self.blocked_sets: set[int] = set()
        self.blocked: list[Blocked] = []
        self.reshapes: list[tuple[int, int, _Layout]] = []
        self.group_fixes: list[GroupFix] = []
        self.index = -1  # the node being handled
        self._const_cache: dict[str, np.ndarray | None] = {}

    # --- facts about tensors ----------------------------------------------------------------------------------
    def layout(self, name: str) -> _Layout | None:
        return self.layouts.get(name) if name else None

    def set_layout(self, name: str, layout: _Layout | None) -> None:
        if name and layout is not None:
            self.layouts[name] = layout

    def is_constant(self, name: str) -> bool:
        return name in self.inits or name in self.constants

    def float_initializer_dims(self, name: str) -> tuple[int, ...] | None:
        t = self.inits.get(name)
        return tuple(int(d) for d in t.dims) if t is not None and t.data_type in FLOAT_TYPES else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of a small constant (shapes, axes, pads, scales): an initializer or a Constant node."""
        if not name:
            return None
        if name not in self._const_cache:
            value = None
            if name in self.inits:
                t = self.inits[name]
                if math.prod(t.dims) <= 64:
                    value = numpy_helper.to_array(t)
            elif name in self.constants:
                value = constant_value(self.constants[name])
            self._const_cache[name] = value
        return self._const_cache[name]

    def dims(self, name: str) -> tuple[int | str | None, ...] | None:
        if name in self.inits:
            return tuple(int(d) for d in self.inits[name].dims)
        if name in self.constants:
            v = self.const(name)
            return None if v is None else tuple(v.shape)
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        d = self.dims(name)
        return None if d is None else len(d)

    def ints(self, name: str) -> list[int] | None:
        v = self.const(name)
        return None if v is None or v.dtype.kind not in "iu" else [int(x) for x in v.reshape(-1)]

    # --- recording --------------------------------------------------------------------------------------------
    def new_set(self, size: int, node: onnx.NodeProto | None = None) -> int:
        return self.sets.new(size, self.index if node is not None else None)

    def add_slice(self, set_id: int, tensor_slice: TensorSlice) -> None:
        self.slices.append((set_id, tensor_slice, self.index))

    def slice_layout(self, layout: _Layout, initializer: str, axis: int, kind: str = "weight", scale: int = 1) -> None:
        """Each segment of `layout` owns its stretch of `initializer` along `axis` (`scale` entries per entry)."""
        offset = 0
        for s in layout.segs:
            self.add_slice(s.set, TensorSlice(initializer, axis, offset * scale, s.block * scale, kind))
            offset += s.size * s.block

    def block(self, layout: _Layout | None, node: onnx.NodeProto, reason: str) -> None:
        if layout is None:
            return
        self.blocked_sets.update(s.set for s in layout.segs)
        self.note(node, reason)

    def note(self, node: onnx.NodeProto, reason: str) -> None:
        entry = Blocked(_node_name(node), node.op_type, reason)
        if entry not in self.blocked:
            self.blocked.append(entry)

    def block_inputs(self, node: onnx.NodeProto, reason: str, inputs: Sequence[str] | None = None) -> None:
        for name in node.input if inputs is None else inputs:
            self.block(self.layout(name), node, reason)

    def opaque(self, node: onnx.NodeProto, name: str, axis: int, width: int, reason: str) -> _Layout:
        """Channels the analysis cannot prune (a grouped Conv's output...): a blocked set, so that whatever
        they are added to or concatenated with is blocked too, with the reason."""
        s = self.new_set(width, node)
        self.blocked_sets.add(s)
        self.note(node, reason)
        layout = _Layout(axis, (_Seg(s, width),))
        self.set_layout(name, layout)
        return layout

    def unite(self, a: _Layout, b: _Layout) -> bool:
        """Make the channels of `a` and `b` the same, segment by segment; False when their runs differ."""
        if [(s.size, s.block) for s in a.segs] != [(s.size, s.block) for s in b.segs]:
            return False
        for sa, sb in zip(a.segs, b.segs, strict=True):
            self.sets.union(sa.set, sb.set)
        return True


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Shapes of every value shape inference reaches (data propagation on: Reshape targets built from Shape)."""
    light = model if model.ByteSize() < 2**30 else _without_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference gives up on some graphs; the analysis then blocks what it needs
        inferred = light
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in tt.shape.dim)
    return shapes


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with big initializers replaced by empty-data stand-ins of the same shape (inference reads dims)."""
    light = copy.deepcopy(model)
    for t in light.graph.initializer:
        if math.prod(t.dims) > 64:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = onnx.TensorProto.DEFAULT
    return light


def _known(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- handlers -------------------------------------------------------------------------------------------------
UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
         "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Neg", "Abs", "Exp", "Sqrt", "Sin", "Cos", "Floor",
         "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "MaxPool", "AveragePool", "GlobalAveragePool",
         "GlobalMaxPool", "LpPool", "GlobalLpPool")


@channel_handler(*UNARY)
def _unary(b: _Builder, node: onnx.NodeProto) -> None:
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
def _elementwise(b: _Builder, node: onnx.NodeProto) -> None:
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


@channel_handler("Conv", "ConvTranspose")
def _conv(b: _Builder, node: onnx.NodeProto) -> None:
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    lay = b.layout(x)
    wd = b.float_initializer_dims(w)
    if wd is None or len(wd) < 3 or b.layout(bias) is not None or (bias and b.float_initializer_dims(bias) is None):
        b.block_inputs(node, f"{node.op_type} whose weight or bias is not a float initializer")
        return
    transposed = node.op_type == "ConvTranspose"
    group = int(_attr(node, "group", 1))
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
        b.set_layout(out, _Layout(1, (_Seg(s, c_out),)))
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
        reason = f"grouped {node.op_type} (group={group}, {c_in} input channels) ties channels group-wise"
        b.block(lay, node, reason)
        b.opaque(node, out, 1, c_out, reason)


@channel_handler("Gemm")
def _gemm(b: _Builder, node: onnx.NodeProto) -> None:
    a, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    wd = b.float_initializer_dims(w)
    if wd is None or len(wd) != 2 or b.is_constant(a) or _attr(node, "transA", 0):
        b.block_inputs(node, "Gemm without a constant weight B applied to its activation rows")
        return
    trans_b = int(_attr(node, "transB", 0))
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
    out_layout = _Layout(1, (_Seg(s, n),))
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
def _matmul(b: _Builder, node: onnx.NodeProto) -> None:
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
    b.set_layout(node.output[0], _Layout(r - 1, (_Seg(s, wd[1]),)))


@channel_handler("BatchNormalization", "InstanceNormalization")
def _norm(b: _Builder, node: onnx.NodeProto) -> None:
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
def _layer_norm(b: _Builder, node: onnx.NodeProto) -> None:
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return
    if r is None or lay.axis >= _axis(int(_attr(node, "axis", -1)), r):
        b.block(lay, node, "LayerNormalization normalises across the channels")
    b.set_layout(node.output[0], lay)  # blocked or not, the same channels come out


def _layout_rank(b: _Builder, node: onnx.NodeProto):
    """(layout, rank) of the node's first input; None when it carries no channels, or when shape inference gave
    it no rank (then the channels are blocked here)."""
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return None
    if r is None:
        b.block(lay, node, "rank unknown to shape inference")
        return None
    return lay, r


@channel_handler("Softmax", "LogSoftmax", "Hardmax")
def _softmax(b: _Builder, node: onnx.NodeProto) -> None:
    found = _layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    axis = _axis(int(_attr(node, "axis", -1 if b.opset >= 13 else 1)), r)
    mixes = lay.axis == axis if b.opset >= 13 else lay.axis >= axis
    if mixes:
        b.block(lay, node, f"{node.op_type} normalises across the channels")
    b.set_layout(node.output[0], lay)


@channel_handler("Concat")
def _concat(b: _Builder, node: onnx.NodeProto) -> None:
    inputs = [n for n in node.input if n]
    tracked = [b.layout(n) for n in inputs if b.layout(n) is not None]
    if not tracked:
        return
    r = b.rank(node.output[0]) or b.rank(inputs[0])
    if r is None:
        b.block_inputs(node, "rank unknown to shape inference")
        return
    axis = _axis(int(_attr(node, "axis", 1)), r)
    if any(lay.axis == axis for lay in tracked):  # along the channels: the layouts are laid end to end
        segs: list[_Seg] = []
        for n in inputs:
            lay = b.layout(n)
            if lay is not None and lay.axis != axis:
                b.block(lay, node, "concatenates channels on different axes")
                lay = None
            if lay is None:
                d = b.dims(n)
                width = d[axis] if d is not None and len(d) == r else None
                if not _known(width):
                    b.block_inputs(node, f"concatenates '{n}', whose channel count is unknown")
                    return
                lay = b.opaque(node, "", axis, int(width), f"concatenates '{n}', whose channels the analysis "
                                                           "cannot follow")
            segs += lay.segs
        b.set_layout(node.output[0], _Layout(axis, tuple(segs)))
        return
    # along another axis (batch, space): the inputs' channels are the same channels
    lays = [b.layout(n) for n in inputs]
    if any(lay is None for lay in lays) or any(not b.unite(lays[0], lay) for lay in lays[1:]):
        b.block_inputs(node, "concatenates along another axis tensors whose channels differ")
        return
    b.set_layout(node.output[0], lays[0])


@channel_handler("Flatten")
def _flatten(b: _Builder, node: onnx.NodeProto) -> None:
    lay, d = b.layout(node.input[0]), b.dims(node.input[0])
    if lay is None:
        return
    if d is None:
        b.block(lay, node, "shape unknown to shape inference")
        return
    axis = _axis(int(_attr(node, "axis", 1)), len(d))
    between, after = d[axis:lay.axis], d[lay.axis + 1:]
    if lay.axis < axis or not all(_known(x) for x in between + after) or math.prod(between) != 1:
        b.block(lay, node, f"Flatten at axis {axis} of a {list(d)} tensor scatters each channel")
        return
    b.set_layout(node.output[0], _Layout(1, lay.scaled(math.prod(after)).segs))


@channel_handler("Reshape")
def _reshape(b: _Builder, node: onnx.NodeProto) -> None:
    """A Reshape that keeps the dimensions before the channel axis and merges the ones after it into it
    (into a Gemm: H*W entries per channel), or leaves the channel axis alone. Anything that splits the
    channel axis (a channel shuffle) is blocked."""
    lay = b.layout(node.input[0])
    if lay is None:
        return
    din, dout = b.dims(node.input[0]), b.dims(node.output[0])
    c = lay.axis
    allowzero = int(_attr(node, "allowzero", 0))
    target = b.ints(node.input[1])
    pieces = [("int", v) for v in target] if target is not None else _target_pieces(b, node.input[1])
    if din is None or pieces is None:
        b.block(lay, node, "Reshape target computed at run time" if din is not None else "shape unknown")
        return
    entry = pieces[c] if c < len(pieces) else ("?", None)
    if dout is None or len(dout) <= c or not _known(dout[c]):
        # `x.view(x.size(0), -1)`: inference leaves the -1 open when the batch is symbolic; the target keeps
        # the dimensions before the channel axis and merges the rest into it
        def same(i: int, p: tuple) -> bool:
            if p[0] == "dim":  # dimension i of a tensor whose dimension i is the input's
                source = b.dims(p[1][1])
                return p[1][0] == i and source is not None and len(source) > i and source[i] == din[i]
            return p == ("int", din[i]) or (p == ("int", 0) and not allowzero)

        keeps_prefix = len(pieces) == c + 1 and all(same(i, p) for i, p in enumerate(pieces[:c]))
        if keeps_prefix and entry == ("int", -1) and all(_known(x) for x in din[c:]):
            dout = (*din[:c], math.prod(din[c:]))
    # Channel ch of the input occupies entries [ch*factor, (ch+1)*factor) of output axis c when the dims after
    # the channel axis merge into it: dout[c] = factor*C and prod(din[c+1:]) = factor*prod(dout[c+1:]) (then
    # the dims before it hold as many entries on both sides, whatever the batch size).
    after_in, after_out = din[c + 1:], (dout or ())[c + 1:]
    if dout is not None and len(dout) > c and _known(dout[c]) and dout[c] < lay.width:
        b.block(lay, node, f"Reshape {list(din)} -> {list(dout)} splits the channel axis (a channel shuffle?)")
        return
    if dout is None or len(dout) <= c or not _known(dout[c]) or not all(_known(x) for x in after_in + after_out):
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


def _target_pieces(b: _Builder, name: str) -> list[tuple[str, object]] | None:
    """A Reshape target built at run time as a Concat of one-element pieces, entry by entry: ("int", v) for a
    constant, ("dim", (i, tensor)) for dimension i of a tensor read with Shape -> Gather (-> Unsqueeze/Cast),
    ("?", None) otherwise. `x.view(x.size(0), -1)` exports as Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])."""
    producer = b.producers.get(name)
    if producer is None or producer.op_type != "Concat" or int(_attr(producer, "axis", 0)) != 0:
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


def _shape_dim(b: _Builder, name: str) -> tuple[str, object]:
    node = b.producers.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        node = b.producers.get(node.input[0])
    if node is not None and node.op_type == "Gather" and int(_attr(node, "axis", 0)) == 0:
        shape = b.producers.get(node.input[0])
        index = b.ints(node.input[1])
        if shape is not None and shape.op_type == "Shape" and index is not None and len(index) == 1 \
                and _attr(shape, "start") is None and index[0] >= 0:
            return ("dim", (index[0], shape.input[0]))
    return ("?", None)


@channel_handler("Transpose")
def _transpose(b: _Builder, node: onnx.NodeProto) -> None:
    found = _layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    perm = [_axis(int(p), r) for p in _attr(node, "perm", list(range(r))[::-1])]
    b.set_layout(node.output[0], lay.moved(perm.index(lay.axis)))


def _axes(b: _Builder, node: onnx.NodeProto, input_index: int) -> list[int] | None:
    """`axes` as an attribute (older opsets) or an input (newer); None: not given; raises LookupError when
    it is an input that is not constant."""
    value = _attr(node, "axes")
    if value is not None:
        return [int(a) for a in value]
    if len(node.input) > input_index and node.input[input_index]:
        ints = b.ints(node.input[input_index])
        if ints is None:
            raise LookupError("axes computed at run time")
        return ints
    return None


def _layout_axes_dims(b: _Builder, node: onnx.NodeProto):
    """(layout, axes, dims) of a node with `axes` as attribute or input 1; None (blocking it where it carries
    channels) when its input has no channels, its axes are computed at run time or its rank is unknown."""
    lay, d = b.layout(node.input[0]), b.dims(node.input[0])
    if lay is None:
        return None
    try:
        axes = _axes(b, node, 1)
    except LookupError as e:
        b.block(lay, node, str(e))
        return None
    if d is None:
        b.block(lay, node, "rank unknown to shape inference")
        return None
    return lay, axes, d


@channel_handler("Squeeze", "Unsqueeze")
def _squeeze(b: _Builder, node: onnx.NodeProto) -> None:
    found = _layout_axes_dims(b, node)
    if found is None:
        return
    lay, axes, d = found
    c = lay.axis
    if node.op_type == "Squeeze":
        axes = [i for i, x in enumerate(d) if x == 1] if axes is None else [_axis(a, len(d)) for a in axes]
        if c in axes:
            b.block(lay, node, "squeezes the channel axis away")
            return
        c -= sum(a < c for a in axes)
    else:
        for a in sorted(_axis(a, len(d) + len(axes or ())) for a in axes or ()):
            c += a <= c
    b.set_layout(node.output[0], lay.moved(c))


@channel_handler("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
                 "ReduceSumSquare")
def _reduce(b: _Builder, node: onnx.NodeProto) -> None:
    found = _layout_axes_dims(b, node)
    if found is None:
        return
    lay, axes, d = found
    if axes is None or not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            b.set_layout(node.output[0], lay)
        else:
            b.block(lay, node, f"{node.op_type} over all axes mixes the channels")
        return
    axes = [_axis(a, len(d)) for a in axes]
    if lay.axis in axes:
        b.block(lay, node, f"{node.op_type} over the channel axis mixes the channels")
        return
    keep = int(_attr(node, "keepdims", 1))
    b.set_layout(node.output[0], lay.moved(lay.axis - (0 if keep else sum(a < lay.axis for a in axes))))


@channel_handler("Pad")
def _pad(b: _Builder, node: onnx.NodeProto) -> None:
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return
    pads = _attr(node, "pads") if b.opset < 11 else b.ints(node.input[1]) if len(node.input) > 1 else None
    axes = b.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None or r is None or (len(node.input) > 3 and node.input[3] and axes is None):
        b.block(lay, node, "Pad amounts computed at run time")
        return
    axes = list(range(r)) if axes is None else [_axis(a, r) for a in axes]
    n = len(axes)
    if lay.axis in axes:
        i = axes.index(lay.axis)
        if pads[i] or pads[i + n]:
            b.block(lay, node, "pads the channel axis")
            return
    b.set_layout(node.output[0], lay)


@channel_handler("Resize", "Upsample")
def _resize(b: _Builder, node: onnx.NodeProto) -> None:
    found = _layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    axes = [_axis(a, r) for a in _attr(node, "axes", list(range(r)))]
    if lay.axis not in axes:
        b.set_layout(node.output[0], lay)
        return
    i = axes.index(lay.axis)
    scales_name = node.input[1] if node.op_type == "Upsample" or b.opset < 11 else (
        node.input[2] if len(node.input) > 2 else "")
    sizes = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
    scales = _attr(node, "scales") or (b.const(scales_name) if scales_name else None)
    if sizes:
        b.block(lay, node, "Resize 'sizes' spells out the channel count")
        return
    if scales is None or len(scales) != len(axes) or float(np.asarray(scales)[i]) != 1.0:
        b.block(lay, node, f"{node.op_type} scales the channel axis (or its scales are computed at run time)")
        return
    b.set_layout(node.output[0], lay)


@channel_handler("Slice")
def _slice(b: _Builder, node: onnx.NodeProto) -> None:
    lay, d = b.layout(node.input[0]), b.dims(node.input[0])
    if lay is None:
        return
    if b.opset < 10:
        starts, ends, axes = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes")
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
    axes = list(range(len(starts or ()))) if axes is None else [_axis(a, len(d)) for a in axes]
    if lay.axis in axes:
        i = axes.index(lay.axis)
        whole = (starts is not None and ends is not None and starts[i] in (0, -(2**63))
                 and ends[i] >= lay.width and (steps is None or steps[i] == 1))
        if not whole:
            b.block(lay, node, "slices the channel axis")
            return
    b.set_layout(node.output[0], lay)


@channel_handler("Split")
def _split(b: _Builder, node: onnx.NodeProto) -> None:
    lay, r = b.layout(node.input[0]), b.rank(node.input[0])
    if lay is None:
        return
    if r is None or _axis(int(_attr(node, "axis", 0)), r) == lay.axis:
        b.block(lay, node, "splits the channel axis")
        return
    for out in node.output:
        b.set_layout(out, lay)


@channel_handler("Shape")
def _shape(b: _Builder, node: onnx.NodeProto) -> None:
    """Reading the shape is fine unless the channel count is read: Gather/Slice of other dimensions only."""
    found = _layout_rank(b, node)
    if found is None:
        return
    lay, r = found
    start = _axis(int(_attr(node, "start", 0)), r)
    end = _attr(node, "end")
    end = r if end is None else min(_axis(int(end), r), r)
    if not start <= lay.axis < end:
        return
    pos = lay.axis - start
    for k, i in b.uses.get(node.output[0], []):
        user = b.graph.node[k]
        if user.op_type == "Gather" and i == 0 and int(_attr(user, "axis", 0)) == 0:
            idx = b.ints(user.input[1])
            if idx is not None and pos not in [_axis(j, end - start) for j in idx]:
                continue
        elif user.op_type == "Slice" and i == 0 and b.opset >= 10:
            s, e = b.ints(user.input[1]), b.ints(user.input[2])
            if s is not None and e is not None and len(s) == 1 and len(user.input) <= 3:
                lo, hi = _axis(s[0], end - start), e[0] if e[0] >= 0 else e[0] + end - start
                if not lo <= pos < hi:
                    continue
        b.block(lay, node, f"reads the channel count (Shape -> {user.op_type} '{_node_name(user)}')")
        return


def _unknown(b: _Builder, node: onnx.NodeProto) -> None:
    inputs = list(node.input) + _captured(node)
    if any(b.layout(n) is not None for n in inputs):
        domain = f" in domain '{node.domain}'" if node.domain not in ("", "ai.onnx") else ""
        b.block_inputs(node, f"{node.op_type}{domain} is not understood by the channel analysis", inputs)


def _captured(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names a subgraph (If/Loop/Scan body) reads."""
    names = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                inner.update(n.output)
                names += [i for i in list(n.input) + _captured(n) if i and i not in inner]
    return names


# --- the analysis -----------------------------------------------------------------------------------------------
def analyze_channels(model: onnx.ModelProto) -> ChannelAnalysis:
    """The channel groups of a normalised ONNX classifier and the nodes whose channels are never pruned.
    Deterministic: groups in graph order of their first producer, slices in the order they are found."""
    return analyze(model).analysis


def analyze(model: onnx.ModelProto) -> Plan:
    """`analyze_channels` plus what the surgery needs (Reshape targets, depthwise `group` attributes)."""
    b = _Builder(model)
    for inp in real_inputs(b.graph):
        d = b.dims(inp.name)
        if d is not None and len(d) >= 2 and _known(d[1]):
            s = b.new_set(int(d[1]))
            b.blocked_sets.add(s)
            b.blocked.append(Blocked(inp.name, "graph input", "the network input's channels are fixed"))
            b.layouts[inp.name] = _Layout(1, (_Seg(s, int(d[1])),))
    for k, node in enumerate(b.graph.node):
        b.index = k
        handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        (handler or _unknown)(b, node)
    producer = {o: node for node in b.graph.node for o in node.output}
    for out in b.graph.output:
        lay = b.layout(out.name)
        if lay is None:
            continue
        for s in lay.segs:
            b.blocked_sets.add(s.set)
            creators = b.sets.creators[b.sets.find(s.set)] or []
            nodes = [b.graph.node[i] for i in creators] or ([producer[out.name]] if out.name in producer else [])
            for n in nodes:
                b.note(n, f"its output channels reach graph output '{out.name}'")
    _tie_shared_initializers(b)
    return _finish(b)


def _tie_shared_initializers(b: _Builder) -> None:
    """A tied weight (or any initializer two sets slice alike) ties the sets; overlapping different slices,
    or a slice plus a use that takes the initializer whole, block them."""
    by_init: dict[str, list[tuple[int, TensorSlice, int]]] = {}
    for entry in b.slices:
        by_init.setdefault(entry[1].initializer, []).append(entry)
    for entries in by_init.values():
        same: dict[tuple[int, int, int, int], int] = {}
        for set_id, s, _ in entries:
            key = (s.axis, s.offset, s.block, b.sets.size[set_id])
            if key in same and b.sets.find(same[key]) != b.sets.find(set_id):
                b.sets.union(same[key], set_id)
            same.setdefault(key, set_id)
    for name, entries in by_init.items():
        slicing_nodes = {k for _, _, k in entries}
        whole = [k for k, _ in b.uses.get(name, []) if k not in slicing_nodes]
        spans: dict[int, list[tuple[int, int, int]]] = {}
        for set_id, s, _ in entries:
            root = b.sets.find(set_id)
            spans.setdefault(s.axis, []).append((s.offset, s.offset + b.sets.size[set_id] * s.block, root))
        clash = None
        for axis_spans in spans.values():
            axis_spans = sorted(set(axis_spans))
            for (_, hi1, r1), (lo2, _, r2) in zip(axis_spans, axis_spans[1:], strict=False):
                if r1 != r2 and lo2 < hi1:
                    clash = f"two channel groups overlap in '{name}'"
        if whole:
            clash = f"uses '{name}' whole, which pruning channels of another node would resize"
        if clash:
            roots = {b.sets.find(set_id) for set_id, _, _ in entries}
            b.blocked_sets.update(roots)
            user = b.graph.node[whole[0]] if whole else b.graph.node[entries[0][2]]
            b.note(user, clash)


def _finish(b: _Builder) -> Plan:
    find = b.sets.find
    blocked_roots = {find(s) for s in b.blocked_sets}
    slices: dict[int, list[TensorSlice]] = {}
    for set_id, s, _ in b.slices:
        root = find(set_id)
        if root not in blocked_roots:
            lst = slices.setdefault(root, [])
            if s not in lst:
                lst.append(s)
    names: dict[int, str] = {}
    groups = []
    roots = sorted((r for r, lst in slices.items() if b.sets.creators[r] and any(s.kind == "weight" for s in lst)),
                   key=lambda r: min(b.sets.creators[r], default=len(b.graph.node)))
    for root in roots:
        creators = sorted(set(b.sets.creators[root]))
        first = b.graph.node[creators[0]]
        names[root] = first.output[0]
        groups.append(ChannelGroup(first.output[0], b.sets.size[root], tuple(slices[root]),
                                   tuple(_node_name(b.graph.node[k]) for k in creators)))

    def seg_names(lay: _Layout) -> tuple[tuple[str | None, int, int], ...]:
        return tuple((names.get(find(s.set)), s.size, s.block) for s in lay.segs)

    tensor_groups = {}
    for name, lay in b.layouts.items():
        g = tuple(dict.fromkeys(n for n, _, _ in seg_names(lay) if n is not None))
        if g:
            tensor_groups[name] = g
    reshapes = tuple(ReshapeFix(k, pos, seg_names(lay)) for k, pos, lay in b.reshapes
                     if any(n is not None for n, _, _ in seg_names(lay)))
    group_fixes = tuple(f for f in b.group_fixes
                        if any(s.initializer == f.weight and s.axis == 0 for g in groups for s in g.slices))
    return Plan(ChannelAnalysis(tuple(groups), tuple(b.blocked)), tensor_groups, reshapes, group_fixes)
