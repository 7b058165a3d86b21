"""Zero biases made explicit where train-time normalization will need one to fold into (not in `PASSES`).

The dynamo exporter folds BatchNorm into the convolutions and, at initialization (β = 0, mean 0), drops the
all-zero bias it would leave: the layer then has nowhere to take the shift a trained BatchNorm folds into it
(force_core/train_norm.py). Each bias-less Conv or Gemm not followed by a normalization gets its optional bias
input, filled with zeros: the same nodes, the same outputs. Run only when train-time normalization is on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import (
    FLOAT_TYPES,
    add_initializer,
    all_names,
    consumers,
    fresh_name,
    initializer_map,
)

NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
                      "LpNormalization", "LRN"})


def _out_features(node: onnx.NodeProto, weight: onnx.TensorProto) -> int | None:
    if node.op_type == "Conv":
        return int(weight.dims[0]) if len(weight.dims) >= 3 else None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if len(weight.dims) != 2 or attrs.get("transA", 0) or attrs.get("beta", 1.0) == 0:
        return None
    return int(weight.dims[0] if attrs.get("transB", 0) else weight.dims[1])


def run(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inits = initializer_map(graph)
    uses = consumers(graph)
    taken = all_names(graph)
    added = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) > 2 and node.input[2]:
            continue
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.data_type not in FLOAT_TYPES:
            continue
        users = uses.get(node.output[0], [])
        if len(users) == 1 and users[0][0].op_type in NORM_OPS:
            continue
        features = _out_features(node, weight)
        if features is None:
            continue
        name = fresh_name(taken, f"{weight.name}__bias")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
        add_initializer(model, numpy_helper.from_array(np.zeros(features, dtype=dtype), name))
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        added.append(node.name or node.output[0])
    if not added:
        return []
    return [f"gave {len(added)} bias-less Conv/Gemm layers an explicit zero bias for train-time normalization "
            f"(first: {', '.join(added[:3])})"]
