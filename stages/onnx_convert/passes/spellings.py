"""Nodes written in a way that means the same as one onnx2torch converts, rewritten to that one.

- `auto_pad` SAME_UPPER / SAME_LOWER (timm's convmixer, Keras and TF exports) becomes the explicit `pads` it stands
  for. With stride 1 the pads follow from the kernel alone; with a larger stride, from the input's spatial size
  (shape inference). A node whose size is not known keeps its auto_pad, and the import names it.
- Trailing empty inputs (an absent optional input written as "": `Clip(x, min, "")` from timm's edgenext) are
  dropped; onnx2torch looks "" up as a tensor. A Clip with only a maximum (`Clip(x, "", max)`, swinv2's logit
  scale) gets -inf as its minimum, which is what an absent one means."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from stages.onnx_convert.passes._graph import add_initializer, initializer_map

_PADDED = frozenset({"Conv"})  # pools take SAME in their own converter (ops/pool.py)
_SAME = (b"SAME_UPPER", b"SAME_LOWER")


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _spatial_sizes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim][2:]
            for v in [*g.input, *g.value_info]}


def _explicit_pads(model: onnx.ModelProto) -> int:
    graph = model.graph
    same = [n for n in graph.node if n.op_type in _PADDED and n.domain in ("", "ai.onnx")
            and any(a.name == "auto_pad" and a.s in _SAME for a in n.attribute)]
    if not same:
        return 0
    inits, sizes, done = initializer_map(graph), None, 0
    for node in same:
        kernel = _ints(node, "kernel_shape")
        if kernel is None and len(node.input) > 1 and node.input[1] in inits:
            kernel = list(inits[node.input[1]].dims[2:])
        if not kernel:
            continue
        strides = _ints(node, "strides") or [1] * len(kernel)
        dilations = _ints(node, "dilations") or [1] * len(kernel)
        if any(s != 1 for s in strides):
            sizes = sizes if sizes is not None else _spatial_sizes(model)
            size = sizes.get(node.input[0])
            if not size or len(size) != len(kernel) or None in size:
                continue
            totals = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                      for n, s, k, d in zip(size, strides, kernel, dilations, strict=True)]
        else:
            totals = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
        upper = next(a.s for a in node.attribute if a.name == "auto_pad") == b"SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*keep, helper.make_attribute("pads", begin + [t - b for t, b in
                                                                         zip(totals, begin, strict=True)])])
        done += 1
    return done


def _drop_trailing_empty_inputs(graph: onnx.GraphProto) -> int:
    done = 0
    for node in graph.node:
        n = len(node.input)
        while n and not node.input[n - 1]:
            n -= 1
        if n < len(node.input):
            del node.input[n:]
            done += 1
    return done


def _clip_minimum(model: onnx.ModelProto) -> int:
    clips = [n for n in model.graph.node if n.op_type == "Clip" and len(n.input) == 3 and not n.input[1]
             and n.input[2]]
    for k, node in enumerate(clips):
        name = f"{node.name or node.output[0]}/absent_min_{k}"
        add_initializer(model, numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), name))
        node.input[1] = name
    return len(clips)


def run(model: onnx.ModelProto) -> list[str]:
    changes = []
    if n := _clip_minimum(model):
        changes.append(f"gave {n} Clip node(s) with only a maximum the minimum -inf")
    if n := _explicit_pads(model):
        changes.append(f"wrote the SAME auto_pad of {n} Conv node(s) as explicit pads")
    if n := _drop_trailing_empty_inputs(model.graph):
        changes.append(f"dropped the empty trailing (absent optional) inputs of {n} node(s)")
    return changes
