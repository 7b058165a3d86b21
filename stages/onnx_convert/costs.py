"""What a model costs to store and run, read from its ONNX graph: parameters (stored and non-zero) and
multiply-accumulates for one image. What the report compares before and after a channel cut; zeros inside a
dense weight still cost their MACs, since runtimes multiply them like any other value."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from stages.onnx_convert.passes._graph import weight_index
from stages.onnx_convert.sparsity import file_sparsity


@dataclass(frozen=True)
class Costs:
    params: int  # float parameters stored
    nonzero_params: int
    prunable_weights: int  # entries of Conv/ConvTranspose/Gemm/MatMul weights
    nonzero_prunable_weights: int
    macs: int  # multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for one image
    weight_macs: int = 0  # those of the nodes with a weight (what a MACs budget counts; not activation products)

    def to_dict(self) -> dict:
        return asdict(self)


def model_costs(model: onnx.ModelProto, input_shape: tuple[int, int, int]) -> Costs:
    """Costs of `model` for one (C, H, W) image; MACs from shapes inferred at batch 1."""
    s = file_sparsity(model)
    macs, weight_macs = _macs(model, input_shape)
    return Costs(params=s.params_total, nonzero_params=s.params_total - s.params_zeros,
                 prunable_weights=s.prunable_total, nonzero_prunable_weights=s.prunable_total - s.prunable_zeros,
                 macs=macs, weight_macs=weight_macs)


def _macs(model: onnx.ModelProto, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(MACs of every Conv/ConvTranspose/Gemm/MatMul, MACs of those with a weight) for one image."""
    shaped, shapes, batch = shaped_at(model, input_shape)
    inits = {t.name for t in shaped.graph.initializer}
    every = weighted = 0
    for node in shaped.graph.node:
        macs = _node_macs(node, shapes)
        every += macs
        weighted += macs if weight_index(node, inits) is not None else 0
    return every // batch, weighted // batch


def macs_per_weight(model: onnx.ModelProto, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Initializer -> the MACs one entry of it performs for one (C, H, W) image: a Conv weight's output positions,
    a Linear weight's tokens. What a weight costs under a compute budget; a weight whose layer's shapes inference
    could not settle is left out (the caller prices it)."""
    shaped, shapes, batch = shaped_at(model, input_shape)
    inits = {t.name for t in shaped.graph.initializer}
    out: dict[str, int] = {}
    for node in shaped.graph.node:
        k = weight_index(node, inits)
        w = node.input[k] if k is not None else ""
        macs = _node_macs(node, shapes) if w and w not in out else 0
        if macs:
            out[w] = max(1, macs // batch // math.prod(shapes[w]))
    return out


def shaped_at(model: onnx.ModelProto, input_shape: tuple[int, int, int]):
    """(a copy of the model with shapes inferred at batch 1, name -> dims, the batch it was inferred at)."""
    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    inits = {t.name for t in shaped.graph.initializer}
    graph_input = next(i for i in shaped.graph.input if i.name not in inits)
    dims = graph_input.type.tensor_type.shape.dim
    for d, v in zip(dims, (1, *input_shape), strict=False):
        if not (d.HasField("dim_value") and d.dim_value > 0):
            d.dim_value = v
    del shaped.graph.value_info[:]
    shaped = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    shapes = {v.name: _dims(v) for v in (*shaped.graph.value_info, *shaped.graph.input, *shaped.graph.output)}
    shapes.update({t.name: tuple(t.dims) for t in shaped.graph.initializer})
    return shaped, shapes, _dims(graph_input)[0] or 1


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)


def _node_macs(node: onnx.NodeProto, shapes: dict) -> int:
    """MACs of one weight-carrying node; 0 for other nodes and for shapes inference could not settle."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
        return 0
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    y = shapes.get(node.output[0])
    if not x or not w or not y or any(v is None for v in (*x, *w, *y)):
        return 0
    if node.op_type == "Conv":  # each output element: C_in/group × kernel MACs (w is [C_out, C_in/group, k…])
        return math.prod(y) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":  # each input element feeds C_out/group × kernel (w: [C_in, C_out/group, k…])
        return math.prod(x) * math.prod(w[1:])
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = x[0] if trans_a else x[-1]
        return math.prod(y) * k
    return math.prod(y) * x[-1]  # MatMul: every output element is a K-long dot product
