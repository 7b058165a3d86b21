"""A model exported with a fixed batch size (often 1) still trains and validates in batches.

The batch dimension of inputs and outputs becomes symbolic; a `Reshape` of batch-dependent data whose
constant target starts with that fixed size gets -1 there (or 0, "copy from the input", when the target
already has a -1). What this cannot
see (an Expand or Tile to a constant batch) is caught by the import's batch-2 check against the source
model, which then names the node onnxruntime rejects.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import UnsupportedOperatorError
from stages.onnx_convert.passes._graph import add_initializer, all_names, consumers, initializer_map, real_inputs

BATCH = "batch"


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
    for v in inputs:
        v.type.tensor_type.shape.dim[0].dim_param = BATCH
    for v in graph.output:
        if _fixed_batch(v) == batch:
            v.type.tensor_type.shape.dim[0].dim_param = BATCH
    changes = [f"made the batch dimension of {sorted(fixed)} dynamic (was {batch})"]
    if len(graph.value_info):
        del graph.value_info[:]  # inferred shapes carry the old batch size; re-inferred on load
        changes.append("dropped stored intermediate shapes (value_info); they are inferred again")

    # values that depend on the data (downstream of an input), as opposed to constants
    dynamic = set(fixed)
    for node in graph.node:
        if any(i in dynamic for i in node.input):
            dynamic.update(node.output)
    inits = initializer_map(graph)
    uses = consumers(graph)
    taken = all_names(graph)
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    rewritten = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] not in dynamic:
            continue
        if node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]])
        elif node.input[1] in constants:
            attr = {a.name: a for a in constants[node.input[1]].attribute}
            if "value" not in attr:
                continue
            target = numpy_helper.to_array(attr["value"].t)
        else:
            continue
        if target.ndim != 1 or target.size == 0 or target[0] != batch:
            continue
        new = target.copy()
        if -1 not in target:
            new[0] = -1  # infer it: right whatever allowzero says
        elif any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            raise UnsupportedOperatorError(
                f"Reshape node '{node.name}' hard-codes batch size {batch} (target {target.tolist()}, allowzero=1); "
                "export the model with a dynamic batch dimension")
        else:
            new[0] = 0  # copy the batch size from the input
        name = node.input[1]
        if len(uses.get(name, [])) > 1 or name in constants:  # shared, or a Constant node: give this node its own
            k = 1
            while f"{name}__batch{k}" in taken:
                k += 1
            name = f"{name}__batch{k}"
            taken.add(name)
            add_initializer(model, numpy_helper.from_array(new.astype(np.int64), name))
            node.input[1] = name
        else:
            inits[name].CopyFrom(numpy_helper.from_array(new.astype(np.int64), name))
        rewritten.append(node.name or node.output[0])
    if rewritten:
        changes.append(f"rewrote the hard-coded batch size in {len(rewritten)} Reshape targets: "
                       f"{', '.join(rewritten[:5])}{' …' if len(rewritten) > 5 else ''}")
    return changes
