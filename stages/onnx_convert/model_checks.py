"""Checks that name the real cause when a classifier cannot be taken as it is (an opset newer than this
installation, non-finite weights, a channels-last or channel-dynamic input), and what its output already is:
logits, or probabilities (a final Softmax), which the training loss must know."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import BadInputError, ModelShapeError, UnsupportedOperatorError
from stages.onnx_convert.passes._graph import FLOAT_TYPES

# Ops that leave a softmax a softmax on the way to the graph output (exporters add them after the head).
_SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})
OUTPUT_KINDS = {"Softmax": "softmax", "LogSoftmax": "log_softmax"}


def check_opset(model: onnx.ModelProto) -> None:
    """UnsupportedOperatorError for an ai.onnx opset newer than the installed onnx knows: the checker would
    otherwise report it as some unknown attribute or operator."""
    limit = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > limit:
            raise UnsupportedOperatorError(
                f"opset {o.version} of domain ai.onnx is newer than this installation supports (onnx "
                f"{onnx.__version__} supports up to {limit}); re-export with --opset/opset_version ≤ {limit}")


# Inputs where an infinity is a value the operator means (a max pool's padding, a clamp's open end, a mask's fill):
# dynamo writes them as one-entry initializers.
_BOUND_INPUTS = {"Pad": {2}, "Clip": {1, 2}, "Where": {1, 2}, "Max": None, "Min": None}


def check_finite_weights(model: onnx.ModelProto) -> None:
    """BadInputError naming the first float initializer holding NaN, or Inf outside a bound (`_BOUND_INPUTS`):
    parity would only say the outputs disagree."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, i))
    bad = []
    for t in model.graph.initializer:
        if t.data_type not in FLOAT_TYPES:
            continue
        a = numpy_helper.to_array(t)
        bounds = bool(uses.get(t.name)) and all(
            op in _BOUND_INPUTS and (_BOUND_INPUTS[op] is None or i in _BOUND_INPUTS[op]) for op, i in uses[t.name])
        n = int(np.count_nonzero(np.isnan(a) if bounds else ~np.isfinite(a)))
        if n:
            bad.append((t.name, n, int(np.size(a))))
    if bad:
        name, n, size = bad[0]
        more = f" ({len(bad) - 1} more initializer(s) too)" if len(bad) > 1 else ""
        raise BadInputError(f"the model's weights are not finite: initializer {name!r} holds {n} NaN/Inf value(s) "
                            f"of {size}{more}; re-export the model from finite weights")


def dims_of(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Each axis as its size, its symbolic name, or None."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def check_image_axes(name: str, dims: Sequence[int | str | None]) -> None:
    """ModelShapeError for an (N, ·, ·, ·) input that is not NCHW with a fixed channel count: a channels-last
    input would be read as H channels, and --image-size cannot fix a dynamic channel axis."""
    if len(dims) != 4:
        return
    c, last = dims[1], dims[3]
    shape = "[" + ", ".join(str(d if d is not None else "?") for d in dims) + "]"
    if last in (1, 3, 4) and not (isinstance(c, int) and c <= 4):
        raise ModelShapeError(
            f"model input {name!r} has shape {shape}, which looks channels-last (NHWC, {last} channel(s) on the last "
            f"axis); force-compress feeds NCHW images: re-export the model with an NCHW input (N, {last}, H, W)")
    if not isinstance(c, int) or c <= 0:
        raise ModelShapeError(
            f"model input {name!r} has shape {shape}: its channel axis is dynamic, and --image-size sets only H "
            "and W; export the model with a fixed channel count (e.g. 3 for RGB, 1 for grey)")


def output_kind(model: onnx.ModelProto) -> str:
    """'softmax' or 'log_softmax' when the graph's output comes from that op (through shape-only ops), else
    'logits'."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(model.graph.output[0].name) if model.graph.output else None
    while node is not None and node.op_type in _SHAPE_ONLY and node.input:
        node = producers.get(node.input[0])
    return OUTPUT_KINDS.get(node.op_type, "logits") if node is not None and node.domain in ("", "ai.onnx") \
        else "logits"


def softmax_warning(kind: str) -> str:
    op = {"softmax": "Softmax", "log_softmax": "LogSoftmax"}[kind]
    loss = "the negative log of its probabilities (nll_loss on log p)" if kind == "softmax" else \
        "nll_loss on it directly"
    return (f"warning: the model's output is a softmax (its last node is {op}), not logits: training uses {loss} "
            "instead of cross-entropy on it; export the logits for a cleaner gradient")


def has_attention(model: onnx.ModelProto) -> bool:
    """Whether the network multiplies two activations (a MatMul neither of whose inputs is a weight: queries times
    keys, attention times values): ViTs, Swin and the hybrids, which train with AdamW where a convnet takes SGD."""
    weights = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # topological order: what weights alone compute (a transposed weight) is a weight
        if all(i in weights or not i for i in n.input):
            weights.update(n.output)
    return any(n.op_type == "MatMul" and not weights.intersection(n.input) for n in model.graph.node)
