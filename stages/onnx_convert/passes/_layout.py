"""Where the batch axis of an operator's input goes in its outputs, one rule per operator family, so that the
batch pass can follow the batch from the graph inputs (axis 0) through the graph. An operator without a rule
ends the trail: its outputs have no known batch axis, and nothing downstream of them is rewritten."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

Axis = int | None


class NodeView:
    """What a rule reads: the node's attributes, the batch axis and rank of each input, constant inputs."""

    def __init__(self, node: onnx.NodeProto, axes: list[Axis], rank: Callable[[str], int | None],
                 const: Callable[[str], np.ndarray | None], dims: Callable[[str], list[int | None] | None]):
        self.node, self.axes = node, axes
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self._rank, self._const, self._dims = rank, const, dims

    def rank(self, i: int = 0, output: bool = False) -> int | None:
        names = self.node.output if output else self.node.input
        return self._rank(names[i]) if i < len(names) and names[i] else None

    def ints(self, attr: str, input_index: int) -> list[int] | None:
        """An int list given as an attribute (older opsets) or as a constant input (newer ones)."""
        if attr in self.attrs:
            return [int(v) for v in np.asarray(self.attrs[attr]).reshape(-1)]
        if input_index < len(self.node.input) and self.node.input[input_index]:
            value = self._const(self.node.input[input_index])
            return None if value is None else [int(v) for v in value.reshape(-1)]
        return None

    def dims(self, i: int = 0) -> list[int | None] | None:
        return self._dims(self.node.input[i]) if i < len(self.node.input) else None


def _norm(axes: list[int], rank: int) -> list[int]:
    return sorted(a + rank if a < 0 else a for a in axes)


# --- the rules: NodeView -> batch axis of output 0 --------------------------------------------------------------
def _same(v: NodeView) -> Axis:
    return v.axes[0]


def _broadcast(v: NodeView) -> Axis:
    out_rank, found = v.rank(output=True), set()
    for i, a in enumerate(v.axes):
        if a is not None:
            r = v.rank(i)
            if r is None or out_rank is None:
                return None
            found.add(a + out_rank - r)
    return found.pop() if len(found) == 1 else None


def _transpose(v: NodeView) -> Axis:
    a, r = v.axes[0], v.rank(0)
    if a is None or r is None:
        return None
    perm = list(v.attrs.get("perm", range(r - 1, -1, -1)))
    return perm.index(a) if a in perm else None


def _flatten(v: NodeView) -> Axis:
    a, r, dims = v.axes[0], v.rank(0), v.dims(0)
    if a is None or r is None:
        return None
    axis = v.attrs.get("axis", 1) % r if r else 0
    if a == 0 and axis >= 1 and dims is not None and all(d == 1 for d in dims[1:axis]):
        return 0
    return None


def _gemm(v: NodeView) -> Axis:
    if v.axes[0] is not None and v.axes[0] == (1 if v.attrs.get("transA", 0) else 0):
        return 0
    return None


def _matmul(v: NodeView) -> Axis:
    out_rank, found = v.rank(output=True), set()
    for i, a in enumerate(v.axes[:2]):
        r = v.rank(i)
        if a is None:
            continue
        if r is None or out_rank is None or r < 2:
            return None
        if i == 0 and a == r - 2:
            found.add(out_rank - 2)  # the rows of A are the rows of the product
        elif a < r - 2:
            found.add(a + out_rank - r)  # a broadcast (stacked) axis
        else:
            return None  # the batch is contracted, or it is the columns of B
    return found.pop() if len(found) == 1 else None


def _unsqueeze(v: NodeView) -> Axis:
    a, r, axes = v.axes[0], v.rank(0), v.ints("axes", 1)
    if a is None or r is None or axes is None:
        return None
    kept = [i for i in range(r + len(axes)) if i not in _norm(axes, r + len(axes))]
    return kept[a]


def _squeeze(v: NodeView) -> Axis:
    a, r, axes = v.axes[0], v.rank(0), v.ints("axes", 1)
    if a is None or r is None:
        return None
    if axes is None:  # every size-1 axis: the batch of a batch-1 export too
        dims = v.dims(0)
        if dims is None or any(d is None for d in dims):
            return None
        axes = [i for i, d in enumerate(dims) if d == 1]
    axes = _norm(axes, r)
    return None if a in axes else a - sum(1 for x in axes if x < a)


def _reduce(v: NodeView) -> Axis:
    a, r = v.axes[0], v.rank(0)
    if a is None or r is None:
        return None
    if v.node.op_type in ("ArgMax", "ArgMin"):
        axes = [v.attrs.get("axis", 0)]
    else:
        axes = v.ints("axes", 1)
        if not axes:
            return a if v.attrs.get("noop_with_empty_axes", 0) else None
    axes = _norm(axes, r)
    if a in axes:
        return None
    return a if v.attrs.get("keepdims", 1) else a - sum(1 for x in axes if x < a)


def _split_like(v: NodeView) -> Axis:
    """Concat and Split: along one axis, which must not be the batch."""
    a, r = v.axes, v.rank(0)
    found = {x for x in a if x is not None}
    if len(found) != 1 or r is None:
        return None
    batch = found.pop()
    axis = v.attrs.get("axis", 0)
    return None if axis % r == batch else batch


def _slice(v: NodeView) -> Axis:
    a, r = v.axes[0], v.rank(0)
    if a is None or r is None:
        return None
    if "starts" in v.attrs:  # Slice-1
        axes = list(v.attrs.get("axes", range(len(v.attrs["starts"]))))
    else:
        axes = v.ints("axes", 3)
        if axes is None:
            if len(v.node.input) > 3 and v.node.input[3]:
                return None  # axes computed at run time
            starts = v.dims(1)  # no axes: the first len(starts) axes
            if not starts or starts[0] is None:
                return None
            axes = list(range(starts[0]))
    return None if a in _norm(axes, r) else a


def _gather(v: NodeView) -> Axis:
    r, q = v.rank(0), v.rank(1)
    if r is None or q is None:
        return None
    axis = v.attrs.get("axis", 0) % r if r else 0
    a, b = v.axes[0], v.axes[1] if len(v.axes) > 1 else None
    if a is not None and b is None:
        if a == axis:
            return None
        return a if a < axis else a + q - 1
    if b is not None and a is None:
        return axis + b  # looking up a table with batch-major indices
    return None


def _expand(v: NodeView) -> Axis:
    a, r, out_rank = v.axes[0], v.rank(0), v.rank(output=True)
    if a is None or r is None or out_rank is None:
        return None
    return a + out_rank - r


def _tile(v: NodeView) -> Axis:
    a = v.axes[0]
    repeats = v.ints("repeats", 1)
    return a if a is not None and repeats is not None and repeats[a] == 1 else None


def _pad(v: NodeView) -> Axis:
    a, r = v.axes[0], v.rank(0)
    pads = v.ints("pads", 1)
    if a is None or r is None or pads is None or len(pads) != 2 * r:
        return None
    return a if pads[a] == 0 and pads[a + r] == 0 else None


_SAME = """Abs Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu Clip Conv
ConvTranspose Cos Cosh DepthToSpace DequantizeLinear Dropout Elu Erf Exp Floor Gelu GlobalAveragePool GlobalLpPool
GlobalMaxPool GroupNormalization HardSigmoid HardSwish Hardmax Identity InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Log LogSoftmax LpNormalization LpPool LRN MaxPool MeanVarianceNormalization Mish Neg Not
QuantizeLinear Reciprocal Relu Resize Round Selu Shrink Sigmoid Sign Sin Sinh Softmax Softplus Softsign SpaceToDepth
Sqrt Tan Tanh ThresholdedRelu Trilu Upsample""".split()
_BROADCAST = """Add And BitShift BitwiseAnd BitwiseOr BitwiseXor Div Equal Greater GreaterOrEqual Less LessOrEqual Max
Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor""".split()
_REDUCE = """ArgMax ArgMin ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare""".split()

RULES: dict[str, Callable[[NodeView], Axis]] = {
    **dict.fromkeys(_SAME, _same), **dict.fromkeys(_BROADCAST, _broadcast), **dict.fromkeys(_REDUCE, _reduce),
    "Transpose": _transpose, "Flatten": _flatten, "Gemm": _gemm, "MatMul": _matmul, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Concat": _split_like, "Split": _split_like, "Slice": _slice,
    "Gather": _gather, "Expand": _expand, "Tile": _tile, "Pad": _pad,
}


def output_axes(v: NodeView) -> list[Axis]:
    """The batch axis of each output (the same for every output of Split; only the first elsewhere)."""
    rule = RULES.get(v.node.op_type) if v.node.domain in ("", "ai.onnx") else None
    if rule is None or all(a is None for a in v.axes):
        return [None] * len(v.node.output)
    axis = rule(v)
    if v.node.op_type == "Split":
        return [axis] * len(v.node.output)
    return [axis] + [None] * (len(v.node.output) - 1)
