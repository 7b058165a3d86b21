"""What `force-compress inspect` shows: per-layer shapes, parameter counts and sparsity of the weights
in the file, opset, producer, and whether import will succeed (by trying it in a temporary directory)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import ForceCompressError
from stages.onnx_convert.model_io import load_checked
from stages.onnx_convert.passes._graph import PRUNABLE_SLOTS, real_inputs


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]


def inspect_model(path: str | os.PathLike, *, try_import: bool = True,
                  image_size: tuple[int, int] | None = None) -> dict:
    model = load_checked(path)
    graph = model.graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for s in graph.sparse_initializer:
        dense = np.zeros(tuple(s.dims), dtype=numpy_helper.to_array(s.values).dtype).reshape(-1)
        dense[numpy_helper.to_array(s.indices).reshape(-1)] = numpy_helper.to_array(s.values)
        tensors[s.values.name] = dense.reshape(tuple(s.dims))
    layers, seen = [], set()
    for node in graph.node:
        for i, name in enumerate(node.input):
            if (node.op_type, i) in PRUNABLE_SLOTS and name in tensors and name not in seen \
                    and tensors[name].ndim >= 2 and tensors[name].dtype.kind == "f":
                seen.add(name)
                t = tensors[name]
                zeros = int(t.size - np.count_nonzero(t))
                layers.append({"initializer": name, "op": node.op_type, "node": node.name, "shape": list(t.shape),
                               "params": int(t.size), "zeros": zeros, "sparsity": zeros / t.size if t.size else 0.0})
    prunable = sum(layer["params"] for layer in layers)
    zeros = sum(layer["zeros"] for layer in layers)
    info = {
        "path": str(path), "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [{"name": v.name, "shape": _dims(v)} for v in real_inputs(graph)],
        "outputs": [{"name": v.name, "shape": _dims(v)} for v in graph.output],
        "nodes": len(graph.node), "initializers": len(graph.initializer),
        "sparse_initializers": len(graph.sparse_initializer),
        "params_total": int(sum(t.size for t in tensors.values() if t.dtype.kind == "f")),
        "prunable_params": prunable, "prunable_zeros": zeros,
        "sparsity": zeros / prunable if prunable else 0.0, "layers": layers,
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    if try_import:
        from stages.import_onnx import import_onnx

        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = import_onnx(path, Path(tmp), image_size=image_size)
                info["import"] = {"ok": True, "changes": list(r.changes), "parity_max_rel": r.parity_max_rel,
                                  "num_classes": r.num_classes, "input_shape": list(r.input_shape)}
            except ForceCompressError as e:
                info["import"] = {"ok": False, "error": str(e), "error_type": type(e).__name__}
    return info
