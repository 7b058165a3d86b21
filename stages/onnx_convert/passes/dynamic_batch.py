"""A model exported with a fixed batch size (often 1) still trains and validates in batches.

The batch dimension of inputs and outputs becomes symbolic. The batch is then followed from the inputs through
the graph (one layout rule per operator, passes/_layout.py), and where the graph hard-codes it, it is rewritten;
only a constant that provably is the batch changes:
- a Reshape of a value whose batch axis is `a`, with a target that keeps the axes before `a` and holds the fixed
  size at `a` (in an initializer, a Constant node, or a Constant -> Unsqueeze -> Concat chain as the TorchScript
  exporter writes a channel shuffle), gets 0 there, "copy from the input" (-1 under allowzero=1);
- a constant of batch 1 concatenated with batch-major values along another axis (a class token made by
  `expand(1, -1, -1)` or `tile`, or the initializer the dynamo exporter folds one into) is broadcast to the
  run-time batch size: Shape -> Gather -> Expand, inserted before the Concat.
What is left (a batch merged into another axis, a constant in some other role) is caught by the import's
batch-2 check against the source model, which then names the node onnxruntime rejects.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import (
    add_initializer,
    all_names,
    consumers,
    real_inputs,
    remove_initializer,
)
from stages.onnx_convert.passes._layout import Axis, NodeView, output_axes
from stages.onnx_convert.passes._shape_values import Element, ShapeValues, infer_dims

BATCH = "batch"
ADDED = "batch/"  # the names of the nodes and values this pass adds start with it


def _fixed_batch(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) and dims[0].HasField("dim_value"):
        return dims[0].dim_value
    return None


def run(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inputs = real_inputs(graph)
    fixed = {v.name: b for v in inputs if (b := _fixed_batch(v)) is not None}
    if not fixed:
        return []
    sizes = set(fixed.values())
    if len(sizes) != 1:
        return []  # inputs with different leading sizes: not a batch dimension we can name
    batch = sizes.pop()
    dims = infer_dims(model)  # before the batch becomes symbolic: concrete shapes
    for v in inputs:
        v.type.tensor_type.shape.dim[0].dim_param = BATCH
    for v in graph.output:
        if _fixed_batch(v) == batch:
            v.type.tensor_type.shape.dim[0].dim_param = BATCH
    changes = [f"made the batch dimension of {sorted(fixed)} dynamic (was {batch})"]
    if len(graph.value_info):
        del graph.value_info[:]  # inferred shapes carry the old batch size; re-inferred on load
        changes.append("dropped stored intermediate shapes (value_info); they are inferred again")
    return changes + _Rewrite(model, batch, dims, sorted(fixed)).run()


def _names(items: list[str]) -> str:
    return f"{', '.join(items[:5])}{' …' if len(items) > 5 else ''}"


class _Rewrite:
    def __init__(self, model: onnx.ModelProto, batch: int, dims: dict, inputs: list[str]):
        self.model, self.graph, self.batch, self.inputs = model, model.graph, batch, inputs
        self.values = ShapeValues(model.graph, dims)
        self.uses = consumers(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.taken = all_names(model.graph) | {n.name for n in model.graph.node}
        self.axes: dict[str, int] = dict.fromkeys(inputs, 0)
        self.dynamic: set[str] = set(inputs)
        self.prelude: list[onnx.NodeProto] = []
        self.before: dict[int, list[onnx.NodeProto]] = {}
        self.replaced: set[str] = set()  # constants some consumer no longer reads
        self.shapes: dict[tuple[int, int], str] = {}
        self.size_name = ""
        self.reshaped: list[str] = []
        self.read: list[str] = []
        self.broadcast: list[str] = []

    # --- the walk ---------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        nodes = list(self.graph.node)
        for node in nodes:
            in_axes: list[Axis] = [self.axes.get(i) if i else None for i in node.input]
            if any(i in self.dynamic for i in node.input):
                self.dynamic.update(node.output)
            standard = node.domain in ("", "ai.onnx")
            if standard and node.op_type == "Reshape":
                out = [self._reshape(node, in_axes[0])]
            else:
                if standard and node.op_type == "Concat":
                    self._broadcast_operands(node, in_axes)
                out = output_axes(NodeView(node, in_axes, self._rank, self.values.value, self.values.dims.get))
            for name, axis in zip(node.output, out, strict=True):
                if axis is not None:
                    self.axes[name] = axis
        if self.prelude or self.before:
            ordered = list(self.prelude)
            for node in nodes:
                ordered.extend(self.before.get(id(node), ()))
                ordered.append(node)
            del self.graph.node[:]
            self.graph.node.extend(ordered)
        self._drop_unused()
        changes = []
        if self.reshaped:
            changes.append(f"rewrote the hard-coded batch size in {len(self.reshaped)} Reshape targets: "
                           f"{_names(self.reshaped)}")
        if self.read:
            changes.append(f"made {len(self.read)} Reshape targets read the batch size at run time (allowzero=1 and "
                           f"a -1 elsewhere): {_names(self.read)}")
        if self.broadcast:
            changes.append(f"broadcast {len(self.broadcast)} batch-1 constants concatenated with the data to the "
                           f"batch size read at run time: {_names(self.broadcast)}")
        return changes

    def _rank(self, name: str) -> int | None:
        d = self.values.dims.get(name)
        return None if d is None else len(d)

    # --- Reshape ----------------------------------------------------------------------------------------------
    def _reshape(self, node: onnx.NodeProto, a: Axis) -> Axis:
        data = self.values.dims.get(node.input[0])
        if a is None or data is None or a >= len(data) or len(node.input) < 2:
            return None
        allowzero = any(x.name == "allowzero" and x.i == 1 for x in node.attribute)
        target = node.input[1]
        for i in range(a):  # the axes before the batch are kept as they are
            e = self.values.element(target, i)
            if e is None or e.literal is None or not (e.literal == data[i] or (e.literal == 0 and not allowzero)):
                return None
        e = self.values.element(target, a, ((node, 1),))
        if e is None:
            return None
        if e.dim_of:
            return a if self.axes.get(e.dim_of) == e.dim else None  # the batch read at run time
        if e.literal == 0 and not allowzero:
            return a
        if e.literal == -1:
            return a if self._same_rest(data, self.values.value(target), a, allowzero) else None
        if e.literal != self.batch:
            return None
        return a if self._rewrite_target(node, e, a, allowzero) else None

    @staticmethod
    def _same_rest(data: list, full: np.ndarray | None, a: int, allowzero: bool) -> bool:
        """-1 at the batch axis is the batch when the other axes hold all the other elements."""
        if full is None or len(full) <= a or any(d is None for i, d in enumerate(data) if i != a):
            return False
        rest = [data[i] if (v == 0 and not allowzero and i < len(data)) else int(v) for i, v in enumerate(full)]
        others = rest[:a] + rest[a + 1:]
        return -1 not in others and np.prod(others) == np.prod(data[:a] + data[a + 1:])

    def _rewrite_target(self, node: onnx.NodeProto, e: Element, a: int, allowzero: bool) -> bool:
        full = self.values.value(node.input[1])
        if not allowzero:
            new = 0  # copy the input's batch
        elif full is not None and -1 not in full.tolist():
            new = -1
        elif full is not None:  # allowzero=1 and a -1 elsewhere: the size itself, read at run time
            parts = [self._constant(full[:a], "prefix"), self._size(), self._constant(full[a + 1:], "suffix")]
            name = self._fresh(f"{ADDED}target_{node.name or node.output[0]}")
            self.before.setdefault(id(node), []).append(
                onnx.helper.make_node("Concat", [p for p in parts if p], [name], axis=0, name=name))
            self._repoint(node, 1, name)
            self.read.append(node.name or node.output[0])
            return True
        else:
            return False
        if self._single_use(e.path):
            self._set_leaf(e, new)
        elif full is not None:  # a target shared with other consumers: this node gets its own
            value = full.copy()
            value[a] = new
            name = self._fresh(f"{node.input[1]}__batch")
            add_initializer(self.model, numpy_helper.from_array(value.astype(np.int64), name))
            self._repoint(node, 1, name)
        else:
            return False
        self.reshaped.append(node.name or node.output[0])
        return True

    def _single_use(self, path) -> bool:
        values = [n.input[i] for n, i in path]
        return all(len(self.uses.get(v, [])) == 1 and v not in self.outputs for v in values[:-1])

    def _set_leaf(self, e: Element, new: int) -> None:
        consumer, index = e.path[-1]
        old = self.values.leaves[e.leaf]
        value = np.asarray(new, dtype=np.int64) if e.index is None else old.copy()
        if e.index is not None:
            value[e.index] = new
        if len(self.uses.get(e.leaf, [])) == 1 and e.leaf not in self.outputs:
            self._write_constant(e.leaf, value)
        else:  # the same literal also feeds something else: this consumer gets its own copy
            name = self._fresh(f"{e.leaf}__batch")
            add_initializer(self.model, numpy_helper.from_array(value, name))
            self._repoint(consumer, index, name)
        self.values.leaves[consumer.input[index]] = value
        self.values._memo.clear()

    def _write_constant(self, name: str, value: np.ndarray) -> None:
        for t in self.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))
                return
        node = self.values.producer[name]
        dtype = self.values.leaves[name].dtype
        for attr in [x for x in node.attribute if x.name in ("value", "value_int", "value_ints")]:
            if attr.name == "value":
                dtype = onnx.helper.tensor_dtype_to_np_dtype(attr.t.data_type)
            node.attribute.remove(attr)
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(value.astype(dtype))))

    # --- Concat of a batch-1 constant with the data --------------------------------------------------------------
    def _broadcast_operands(self, node: onnx.NodeProto, in_axes: list[Axis]) -> None:
        found = {x for x in in_axes if x is not None}
        rank = self._rank(node.output[0]) or self._rank(node.input[0])
        if self.batch != 1 or len(found) != 1 or not rank:
            return
        a = found.pop()
        axis = next((x.i for x in node.attribute if x.name == "axis"), 0) % rank
        if a == axis:
            return
        for i, name in enumerate(node.input):
            d = self.values.dims.get(name)
            if in_axes[i] is not None or name in self.dynamic or d is None or len(d) != rank or d[a] != 1:
                continue
            out = self._fresh(f"{name}__batch")
            expand = onnx.helper.make_node("Expand", [name, self._batch_shape(rank, a)], [out],
                                           name=self._fresh(f"{ADDED}broadcast_{name}"))
            self.before.setdefault(id(node), []).append(expand)
            self.values.dims[out] = list(d)
            self._repoint(node, i, out)
            in_axes[i] = a
            producer = self.values.producer.get(name)
            self.broadcast.append(f"{name} ({producer.op_type if producer else 'initializer'}) "
                                  f"into {node.name or node.output[0]}")

    def _batch_shape(self, rank: int, a: int) -> str:
        """[1, …, N at `a`, …, 1]: N read from the input at run time (Shape -> Gather), once per rank and axis."""
        if (rank, a) in self.shapes:
            return self.shapes[(rank, a)]
        ones = np.ones(rank, np.int64)
        parts = [self._constant(ones[:a], "ones"), self._size(), self._constant(ones[a + 1:], "ones")]
        name = self._fresh(f"{ADDED}shape_rank{rank}_axis{a}")
        self.prelude.append(onnx.helper.make_node("Concat", [p for p in parts if p], [name], axis=0, name=name))
        self.shapes[(rank, a)] = name
        return name

    def _size(self) -> str:
        """[N], the batch size of the input at run time (Shape -> Gather, added once at the top of the graph)."""
        if not self.size_name:
            self.size_name, shape = self._fresh(f"{ADDED}size"), self._fresh(f"{ADDED}input_shape")
            index = self._constant(np.zeros(1, np.int64), "index")
            self.prelude += [
                onnx.helper.make_node("Shape", [self.inputs[0]], [shape], name=self._fresh(f"{ADDED}Shape")),
                onnx.helper.make_node("Gather", [shape, index], [self.size_name], axis=0,
                                      name=self._fresh(f"{ADDED}Gather"))]
        return self.size_name

    def _constant(self, value: np.ndarray, what: str) -> str:
        """A new int64 initializer; "" for an empty one (left out of a Concat)."""
        if not value.size:
            return ""
        name = self._fresh(f"{ADDED}{what}")
        add_initializer(self.model, numpy_helper.from_array(value.astype(np.int64), name))
        return name

    # --- bookkeeping ----------------------------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}{k}"
        self.taken.add(name)
        return name

    def _repoint(self, node: onnx.NodeProto, index: int, name: str) -> None:
        old = node.input[index]
        self.uses[old] = [(n, i) for n, i in self.uses.get(old, []) if not (n is node and i == index)]
        self.replaced.add(old)
        node.input[index] = name
        self.uses.setdefault(name, []).append((node, index))

    def _drop_unused(self) -> None:
        """Constants no consumer reads any more after a rewrite (a Constant node, an initializer) go."""
        uses = consumers(self.graph)
        dead = {n for n in self.replaced if n not in uses and n not in self.outputs}
        for node in [n for n in self.graph.node if n.op_type == "Constant" and n.output[0] in dead]:
            self.graph.node.remove(node)
        for name in dead & {t.name for t in self.graph.initializer}:
            remove_initializer(self.model, name)
