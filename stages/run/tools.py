"""The commands that compose stages outside a run (`force-compress masks`, `apply-masks`, `inspect`): a model is
imported into a temporary directory and the stage's own function does the rest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx

import force_core
from pipeline.config import resolve_budget
from pipeline.data import load_data, mask_batches
from pipeline.errors import BadInputError, ForceCompressError
from stages.compute_masks import MaskResult, compute_masks_stage, mask_batch_count
from stages.export_onnx import ExportResult, export_onnx
from stages.import_onnx import import_onnx
from stages.onnx_convert.mask_file import effective_sidecar
from stages.onnx_convert.model_checks import dims_of
from stages.onnx_convert.model_io import load_checked
from stages.onnx_convert.passes._graph import real_inputs
from stages.onnx_convert.sparsity import file_sparsity
from stages.onnx_convert.to_torch import load_module


def masks_for(model: str | os.PathLike, out: str | os.PathLike, *, method: str, sparsity: float,
              data: str | None = None, steps: int | None = None, schedule: str = "exp", batch_size: int = 128,
              batches_per_step: int = 1, image_size: tuple[int, int] | None = None, seed: int = 0,
              train_norm: bool = True, min_per_layer: int = 0, structure: str = "unstructured",
              channel_multiple: int | None = None, budget: str | None = None, latency_batch: int = 1,
              weight_sparsity: float | None = None, channel_ranking: str = "global") -> MaskResult:
    """Masks for `model` written to `out` (masks.npz and its sidecar), on `data` for methods that score on data."""
    if not 0.0 < sparsity < 1.0:
        raise BadInputError(f"--sparsity must be in (0, 1) (pruned fraction), got {sparsity}")
    try:
        budget = resolve_budget(budget, structure, weight_sparsity, channel_ranking)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    if data is None and force_core.needs_data(method, structure):
        free = ", ".join(sorted(force_core.data_free_methods(structure)))
        raise BadInputError(f"method {method!r} scores weights on data: give --data (data-free methods: {free})")
    with tempfile.TemporaryDirectory() as tmp:
        imported = import_onnx(model, tmp, image_size=image_size, train_norm=train_norm)
        batches = None
        if data is not None:
            splits = load_data(data, imported.input_shape, num_classes=imported.num_classes, seed=seed, augment=False)
            batches = mask_batches(splits, batch_size, mask_batch_count(method, steps, batches_per_step, structure),
                                   seed=seed)
        return compute_masks_stage(imported.normalized_path, out, method=method, density=1.0 - sparsity,
                                   steps=steps, schedule=schedule, batches=batches, batches_per_step=batches_per_step,
                                   seed=seed, train_norm=train_norm, min_per_layer=min_per_layer, structure=structure,
                                   channel_multiple=channel_multiple, budget=budget, latency_batch=latency_batch,
                                   weight_sparsity=weight_sparsity, channel_ranking=channel_ranking)


def apply_masks(model: str | os.PathLike, masks: str | os.PathLike, out: str | os.PathLike, *,
                storage: str = "dense", image_size: tuple[int, int] | None = None) -> ExportResult:
    """`model` with the weights `masks` prunes set to 0.0 (no training), written to `out`."""
    side = Path(masks).with_suffix(".json")
    meta = json.loads(side.read_text()) if side.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        imported = import_onnx(model, tmp, image_size=image_size)
        provenance = {"source_sha256": imported.source_sha256, "method": meta.get("method", "unknown"),
                      "sparsity": meta.get("target_sparsity"), "masks": Path(masks).name, "trained": False}
        return export_onnx(imported.normalized_path, None, out, masks_path=masks, storage=storage,
                           provenance=provenance)


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d if d is not None else "?" for d in dims_of(v)]


def inspect_model(path: str | os.PathLike, *, try_import: bool = True,
                  image_size: tuple[int, int] | None = None) -> dict:
    """What `force-compress inspect` shows: per-layer shapes, parameter counts and sparsity of the weights in the file
    (counted as the validation gate counts them), opset, producer, and whether import will succeed (by trying it in a
    temporary directory)."""
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
    module, param_map = load_module(normalized_path)
    params = dict(module.named_parameters())
    masks = {n: params[n].detach() != 0 for n in param_map.prunable}
    return effective_sidecar(force_core.effective_sparsity(module, masks, input_shape), param_map)
