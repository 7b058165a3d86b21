"""What `force-compress inspect` shows: per-layer shapes, parameter counts and sparsity of the weights
in the file (counted as the validation gate counts them), opset, producer, and whether import will succeed
(by trying it in a temporary directory)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from pipeline.errors import ForceCompressError
from stages.onnx_convert.model_io import load_checked
from stages.onnx_convert.passes._graph import real_inputs
from stages.onnx_convert.sparsity import file_sparsity


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]


def inspect_model(path: str | os.PathLike, *, try_import: bool = True,
                  image_size: tuple[int, int] | None = None) -> dict:
    model = load_checked(path)
    graph = model.graph
    sparsity = file_sparsity(model)
    layers = [{"initializer": layer.name, "op": layer.op, "shape": list(layer.shape), "params": layer.numel,
               "zeros": layer.zeros, "sparsity": layer.sparsity} for layer in sparsity.layers]
    info = {
        "path": str(path), "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [{"name": v.name, "shape": _dims(v)} for v in real_inputs(graph)],
        "outputs": [{"name": v.name, "shape": _dims(v)} for v in graph.output],
        "nodes": len(graph.node), "initializers": len(graph.initializer),
        "sparse_initializers": len(graph.sparse_initializer),
        "params_total": sparsity.params_total, "prunable_params": sparsity.prunable_total,
        "prunable_zeros": sparsity.prunable_zeros, "sparsity": sparsity.sparsity, "layers": layers,
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    if try_import:
        from stages.import_onnx import import_onnx

        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = import_onnx(path, Path(tmp), image_size=image_size)
                info["import"] = {"ok": True, "changes": list(r.changes), "parity_max_rel": r.parity_max_rel,
                                  "num_classes": r.num_classes, "input_shape": list(r.input_shape)}
                info["effective"] = file_effective_sparsity(r.normalized_path, r.input_shape)
            except ForceCompressError as e:
                info["import"] = {"ok": False, "error": str(e), "error_type": type(e).__name__}
    return info


def file_effective_sparsity(normalized_path: str | os.PathLike, input_shape: tuple[int, ...]) -> dict:
    """Effective sparsity of the file's own zeros (mask = prunable weight != 0), keyed by initializer name as in
    masks.json: which of the non-zero weights lie on an input→output path."""
    import force_core
    from stages.compute_masks import effective_sidecar
    from stages.import_onnx import load_module

    module, param_map = load_module(normalized_path)
    params = dict(module.named_parameters())
    masks = {n: params[n].detach() != 0 for n in param_map.prunable}
    return effective_sidecar(force_core.effective_sparsity(module, masks, input_shape), param_map)
