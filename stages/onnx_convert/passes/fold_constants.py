"""Weights held in `Constant` / `ConstantOfShape` nodes become initializers (onnx2torch's converters
look weights up among the initializers: a KeyError otherwise; the onnx `light_*` models build every
weight with ConstantOfShape)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import (
    FLOAT_TYPES,
    add_initializer,
    constant_value,
    consumers,
    initializer_map,
    remove_initializer,
)


def _constant_of_shape(node: onnx.NodeProto, known: dict[str, np.ndarray]) -> np.ndarray | None:
    shape = known.get(node.input[0])
    if shape is None:
        return None
    fill = np.zeros(1, dtype=np.float32)
    for attr in node.attribute:
        if attr.name == "value":
            fill = numpy_helper.to_array(attr.t)
    return np.full([int(d) for d in shape.reshape(-1)], fill.reshape(-1)[0], dtype=fill.dtype)


def run(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inits = initializer_map(graph)
    known = {name: numpy_helper.to_array(t) for name, t in inits.items() if t.data_type == onnx.TensorProto.INT64}
    changes, folded, dropped_nodes = [], 0, []
    for node in graph.node:
        if node.op_type == "Constant":
            value = constant_value(node)
            if value is None:
                continue
            if value.dtype == np.int64:
                known[node.output[0]] = value
            tensor_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            if tensor_type not in FLOAT_TYPES or value.ndim == 0:
                continue  # shapes, axes and scalars stay Constant nodes
        elif node.op_type == "ConstantOfShape":
            value = _constant_of_shape(node, known)
            if value is None:
                continue
        else:
            continue
        add_initializer(model, numpy_helper.from_array(value, node.output[0]))
        dropped_nodes.append(node)
        folded += 1
    if not folded:
        return []
    for node in dropped_nodes:
        graph.node.remove(node)
    changes.append(f"folded {folded} Constant/ConstantOfShape weight nodes into initializers")
    # shape initializers that only fed the folded ConstantOfShape nodes are now dead
    uses = consumers(graph)
    outputs = {o.name for o in graph.output}
    dead = [t.name for t in graph.initializer
            if t.name not in uses and t.name not in outputs
            and any(n.op_type == "ConstantOfShape" and n.input[0] == t.name for n in dropped_nodes)]
    for name in dead:
        remove_initializer(model, name)
    if dead:
        changes.append(f"removed {len(dead)} shape initializers used only by the folded ConstantOfShape nodes")
    return changes
