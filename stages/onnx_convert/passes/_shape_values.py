"""What the batch pass knows before running anything: the dims of every value as shape inference finds them on
the model as exported (a fixed batch makes them mostly concrete), the value of small int tensors computed from
constants alone, and where one element of a shape tensor comes from: a literal held in an initializer or
Constant node (and the chain of nodes that carries it), or a dimension of some value read by `Shape`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import constant_value

Dims = list[int | None]
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
_SMALL = 1024  # int tensors up to this size are read as shape values
_EVALUATED = {"Identity", "Cast", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Gather"}


def infer_dims(model: onnx.ModelProto) -> dict[str, Dims]:
    """Shape inference on a copy that holds the graph but not the weights (float initializers become inputs of
    the same type and shape): fast on large models, and the 2 GB protobuf limit does not apply."""
    graph = onnx.GraphProto(name=model.graph.name)
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.data_type in _INT_TYPES and _numel(t) <= _SMALL:
            graph.initializer.append(t)
        elif t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    light = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    light.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help here; without it nothing is rewritten
        inferred = light
    dims: dict[str, Dims] = {t.name: [int(d) for d in t.dims] for t in model.graph.initializer}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return dims


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


@dataclass(frozen=True)
class Element:
    """One element of a shape tensor: `literal` held at `index` of the constant `leaf` (None: a scalar) and
    carried to the consumer through `path` ((node, input index) pairs, consumer first); or `dim` of `dim_of`."""

    literal: int | None = None
    leaf: str = ""
    index: int | None = None
    path: tuple[tuple[onnx.NodeProto, int], ...] = ()
    dim_of: str = ""
    dim: int = 0


class ShapeValues:
    def __init__(self, graph: onnx.GraphProto, dims: dict[str, Dims]):
        self.dims = dims
        self.producer = {o: n for n in graph.node for o in n.output}
        self.leaves: dict[str, np.ndarray] = {}
        for t in graph.initializer:
            if t.data_type in _INT_TYPES and _numel(t) <= _SMALL:
                self.leaves[t.name] = numpy_helper.to_array(t).astype(np.int64)
        for n in graph.node:
            if n.op_type == "Constant" and (value := _constant(n)) is not None:
                self.leaves[n.output[0]] = value
        self._memo: dict[str, np.ndarray | None] = {}

    def length(self, name: str) -> int | None:
        value = self.value(name)
        if value is not None:
            return int(value.size)
        d = self.dims.get(name)
        return d[0] if d is not None and len(d) == 1 else None

    def value(self, name: str) -> np.ndarray | None:
        """The value of an int tensor computed from constants alone (no `Shape` of a run-time value)."""
        if name in self.leaves:
            return self.leaves[name]
        if name not in self._memo:
            self._memo[name] = None  # cycles cannot happen in a valid graph; this also caps the recursion
            self._memo[name] = self._evaluate(name)
        return self._memo[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        node, d = self.producer.get(name), self.dims.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _EVALUATED:
            return None
        if d is not None and (len(d) > 1 or (d and (d[0] is None or d[0] > _SMALL))):
            return None  # not a shape tensor: data is never followed up the graph
        inputs = [self.value(i) if i else None for i in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if not inputs or inputs[0] is None:
            return None
        x = inputs[0]
        if op in ("Identity", "Cast"):
            return x
        if op == "Concat" and all(v is not None for v in inputs):
            return np.concatenate([v.reshape(-1) for v in inputs])
        if op == "Unsqueeze" and x.ndim == 0:
            return x.reshape(1)
        if op == "Squeeze" and x.size == 1:
            return x.reshape(())
        if op == "Reshape" and inputs[1] is not None and inputs[1].size == 1:  # to 1-D: the shape tensors here
            return x.reshape(-1)
        if op == "Gather" and attrs.get("axis", 0) == 0 and x.ndim == 1 and inputs[1] is not None:
            return x[inputs[1]]
        return None

    def element(self, name: str, k: int, path: tuple = ()) -> Element | None:
        """Where element `k` of the 1-D (or, for k = 0, 0-D) int tensor `name` comes from."""
        if name in self.leaves:
            v = self.leaves[name]
            if v.ndim == 0 and k == 0:
                return Element(literal=int(v), leaf=name, path=path)
            if v.ndim == 1 and 0 <= k < v.size:
                return Element(literal=int(v[k]), leaf=name, index=k, path=path)
            return None
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or len(path) > 16:
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op in ("Identity", "Cast") or (op == "Reshape" and len(self.dims.get(node.input[0]) or [0, 0]) == 1):
            return self.element(node.input[0], k, (*path, (node, 0)))
        if op in ("Unsqueeze", "Squeeze") and k == 0 and self.length(node.input[0]) in (None, 1):
            return self.element(node.input[0], 0, (*path, (node, 0)))
        if op == "Concat":
            offset = 0
            for i, part in enumerate(node.input):
                n = self.length(part)
                if n is None:
                    return None
                if k < offset + n:
                    return self.element(part, k - offset, (*path, (node, i)))
                offset += n
            return None
        if op == "Shape":
            rank = len(self.dims.get(node.input[0]) or [])
            start = attrs.get("start", 0)
            start = start + rank if start < 0 else start
            return Element(dim_of=node.input[0], dim=start + k, path=path)
        if op == "Gather" and attrs.get("axis", 0) == 0:
            indices = self.value(node.input[1])
            if indices is None or k >= max(indices.size, 1):
                return None
            j = int(indices.reshape(-1)[k])
            n = self.length(node.input[0])
            if j < 0 and n is None:
                return None
            return self.element(node.input[0], j + n if j < 0 else j, (*path, (node, 0)))
        if op == "Slice" and len(node.input) >= 3:
            starts = self.value(node.input[1])
            axes = self.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            steps = self.value(node.input[4]) if len(node.input) > 4 and node.input[4] else None
            n = self.length(node.input[0])
            if starts is None or starts.size != 1 or n is None or (axes is not None and int(axes.reshape(-1)[0]) != 0):
                return None
            start, step = int(starts.reshape(-1)[0]), int(steps.reshape(-1)[0]) if steps is not None else 1
            start = min(max(start + n if start < 0 else start, 0), n - 1) if step > 0 else None
            if start is None:
                return None
            return self.element(node.input[0], start + k * step, (*path, (node, 0)))
        return None


def _constant(node: onnx.NodeProto) -> np.ndarray | None:
    """A Constant node's value when it is a small int tensor (a shape value)."""
    if any(a.name == "value" and (a.t.data_type not in _INT_TYPES or _numel(a.t) > _SMALL) for a in node.attribute):
        return None
    value = constant_value(node)
    return None if value is None or value.dtype.kind not in "iu" else value.astype(np.int64)
