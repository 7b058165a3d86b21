"""The state of one walk over the graph (`ChannelBuilder`): the facts about tensors a handler reads (layouts,
constants, shapes from ONNX shape inference) and what it records (slices, unions, blocked sets, Reshape and
depthwise `group` fixes); plus the small node helpers the handlers share.

Imports onnx and numpy only; never torch, force_core, flows, prefect or click.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.channels.model import Blocked, ChannelLayout, ChannelSegment, GroupFix, TensorSlice
from stages.onnx_convert.channels.sets import ChannelSets
from stages.onnx_convert.passes._graph import FLOAT_TYPES, constant_value


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


class ChannelBuilder:
    """One walk over `model`'s graph: what the handlers read and what they record (see the module docstring)."""

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
        self.shapes = infer_shapes(model)
        self.sets = ChannelSets()
        self.layouts: dict[str, ChannelLayout] = {}
        self.slices: list[tuple[int, TensorSlice, int]] = []  # (set, slice, node index)
        self.blocked_sets: set[int] = set()
        self.blocked: list[Blocked] = []
        self.reshapes: list[tuple[int, int, ChannelLayout]] = []
        self.group_fixes: list[GroupFix] = []
        self.norms: list[tuple[int, ChannelLayout]] = []  # LayerNormalization over the channels: node index, layout
        self.splits: dict[int, tuple[int, int]] = {}  # set -> (the set of its 1/k channels, k): see split_set
        self.index = -1  # the node being handled
        self._const_cache: dict[str, np.ndarray | None] = {}

    # --- facts about tensors ----------------------------------------------------------------------------------
    def layout(self, name: str) -> ChannelLayout | None:
        lay = self.layouts.get(name) if name else None
        return None if lay is None else self.current(lay)

    def current(self, layout: ChannelLayout) -> ChannelLayout:
        """`layout` with every set split since it was recorded written as its k runs of the smaller set."""
        if not any(s.set in self.splits for s in layout.segs):
            return layout
        segs: list[ChannelSegment] = []
        for s in layout.segs:
            if s.set in self.splits:
                sub, k = self.splits[s.set]
                segs += self.current(ChannelLayout(layout.axis, (ChannelSegment(sub, s.size // k, s.block),))).segs * k
            else:
                segs.append(s)
        return ChannelLayout(layout.axis, tuple(segs))

    def set_layout(self, name: str, layout: ChannelLayout | None) -> None:
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

    def slice_layout(self, layout: ChannelLayout, initializer: str, axis: int, kind: str = "weight",
                     scale: int = 1) -> None:
        """Each segment of `layout` owns its stretch of `initializer` along `axis` (`scale` entries per entry)."""
        offset = 0
        for s in self.current(layout).segs:
            self.add_slice(s.set, TensorSlice(initializer, axis, offset * scale, s.block * scale, kind))
            offset += s.size * s.block

    def block(self, layout: ChannelLayout | None, node: onnx.NodeProto, reason: str) -> None:
        if layout is None:
            return
        self.blocked_sets.update(s.set for s in self.current(layout).segs)
        self.note(node, reason)

    def note(self, node: onnx.NodeProto, reason: str) -> None:
        entry = Blocked(node_name(node), node.op_type, reason)
        if entry not in self.blocked:
            self.blocked.append(entry)

    def block_inputs(self, node: onnx.NodeProto, reason: str, inputs: Sequence[str] | None = None) -> None:
        for name in node.input if inputs is None else inputs:
            self.block(self.layout(name), node, reason)

    def opaque(self, node: onnx.NodeProto, name: str, axis: int, width: int, reason: str) -> ChannelLayout:
        """Channels the analysis cannot prune (a grouped Conv's output...): a blocked set, so that whatever
        they are added to or concatenated with is blocked too, with the reason."""
        s = self.new_set(width, node)
        self.blocked_sets.add(s)
        self.note(node, reason)
        layout = ChannelLayout(axis, (ChannelSegment(s, width),))
        self.set_layout(name, layout)
        return layout

    def unite(self, a: ChannelLayout, b: ChannelLayout) -> bool:
        """Make the channels of `a` and `b` the same, segment by segment; a segment that spans several of the
        other's is split into equal runs (split_set). False when the runs cannot be made alike."""
        while True:
            a, b = self.current(a), self.current(b)
            if [(s.size, s.block) for s in a.segs] == [(s.size, s.block) for s in b.segs]:
                break
            if a.width != b.width or not self._split_at(a, b) and not self._split_at(b, a):
                return False
        for sa, sb in zip(a.segs, b.segs, strict=True):
            self.sets.union(sa.set, sb.set)
        return True

    def _split_at(self, lay: ChannelLayout, other: ChannelLayout) -> bool:
        """Split the first segment of `lay` that `other`'s boundaries cut into equal runs; False when none is
        (or one is cut unevenly, which no split can follow)."""
        cuts = set(itertools.accumulate(s.size * s.block for s in other.segs))
        start = 0
        for s in lay.segs:
            width = s.size * s.block
            inner = sorted(c - start for c in cuts if start < c < start + width)
            start += width
            if not inner:
                continue
            k = len(inner) + 1
            if s.size % k or inner != [width // k * i for i in range(1, k)]:
                return False
            self.split_set(s.set, k)
            return True
        return False

    def split_set(self, set_id: int, k: int) -> int:
        """Channel c of `set_id` (and of every set united with it) becomes channel c mod size/k of one new set
        of size/k: the same channels in each of its k runs, as a grouped Conv prunes them (the same channels in
        every group). Slices recorded so far are rewritten; layouts follow through `current`. Returns the new
        set."""
        root = self.sets.find(set_id)
        size = self.sets.size[root] // k
        members = [i for i in range(len(self.sets.parent)) if i not in self.splits and self.sets.find(i) == root]
        subs = {m: self.sets.new(size, None) for m in members}
        first = subs[root]
        for m, sub in subs.items():
            self.splits[m] = (sub, k)
            self.sets.union(first, sub)
            if m in self.blocked_sets:
                self.blocked_sets.add(sub)
        self.sets.creators[self.sets.find(first)] = list(self.sets.creators[root])
        rewritten = []
        for set_id_, s, k_node in self.slices:
            if set_id_ not in subs:
                rewritten.append((set_id_, s, k_node))
                continue
            rewritten += [(subs[set_id_], replace(s, offset=s.offset + j * size * s.block), k_node) for j in range(k)]
        self.slices = rewritten
        return self.sets.find(first)


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
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


def known(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def nonneg_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
