"""Small graph helpers shared by the passes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

# Which input of each operator is its weight (the tensor pruning removes entries from), in the order
# looked for: Conv/ConvTranspose W, Gemm B (A when it is the constant); MatMul has no fixed side, whichever
# operand is an initializer is the weight.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}


def weight_index(node: onnx.NodeProto, constants) -> int | None:
    """Which input of `node` is its weight: the first of WEIGHT_INPUTS that names one of `constants`. A MatMul
    of two constants (a model's fixed coordinate table times a Linear's weight, once folded) has its weight on
    the right; the left operand is a constant of the model, never pruned."""
    for idx in WEIGHT_INPUTS.get(node.op_type, ()):
        if idx < len(node.input) and node.input[idx] in constants:
            return idx
    return None


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time: IR < 4 also lists every initializer as an input."""
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, i))
    return uses


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.output)
        names.update(node.input)
    return names


def add_initializer(model: onnx.ModelProto, tensor: onnx.TensorProto) -> None:
    """Add an initializer; IR < 4 requires every initializer to be listed as a graph input too."""
    model.graph.initializer.append(tensor)
    if model.ir_version < 4:
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def remove_initializer(model: onnx.ModelProto, name: str) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            del model.graph.initializer[i]
            break
    for i, v in enumerate(model.graph.input):
        if v.name == name:
            del model.graph.input[i]
            break


def copy_tensor(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).copy(), name)


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a Constant node holds (`value`, `value_int(s)`, `value_float(s)`), or None for other forms."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_int":
            return np.asarray(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), dtype=np.int64)
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
    return None


def fresh_name(taken: set[str], base: str, sep: str = "") -> str:
    """`base`, or `base{sep}2`, `base{sep}3`, … : the first not in `taken`, which it joins."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{sep}{k}"
    taken.add(name)
    return name
