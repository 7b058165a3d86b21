"""Stage `export_onnx`: write a trained module's values back into the normalised graph's initializers.

Nodes, names, interface, opset, IR version, doc strings and metadata stay; only initializer values
change (pruned entries exactly 0.0) and provenance and the preprocessing of training (mean/std, resize, labels:
pipeline.preprocessing) join `metadata_props`. Re-exporting the module
with torch.onnx.export is not the way out: onnx2torch's modules do not export cleanly and users expect
their own graph back. Imports onnx, onnxruntime, torch and `pipeline`; never flows, prefect or click.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pipeline.artifacts import RunFiles, atomic_path
from pipeline.errors import BadInputError, ForceCompressError
from pipeline.preprocessing import Preprocessing, describe_splits
from pipeline.stage import DATA_FIELDS, Stage
from stages.onnx_convert import runtime
from stages.onnx_convert.model_io import fits_in_protobuf, save_model
from stages.onnx_convert.passes._graph import real_inputs
from stages.onnx_convert.sparse_storage import to_sparse_initializers
from stages.onnx_convert.to_torch import load_module

__all__ = ["STAGE", "ExportResult", "export_onnx", "export_stage", "write_values"]

PROVENANCE_PREFIX = "force_compress."


@dataclass(frozen=True)
class ExportResult:
    out_path: Path
    storage: str  # "dense" or "sparse"
    size_bytes: int  # the written file
    gzip_bytes: int
    dense_size_bytes: int  # the same model with dense initializers
    dense_gzip_bytes: int
    sparse_size_bytes: int  # ... and with sparse_initializer where smaller
    sparse_gzip_bytes: int
    sparse_initializers: tuple[str, ...]  # written as sparse_initializer (or that would be, for dense)
    n_initializers_written: int
    n_pruned: int  # prunable entries that are exactly 0.0
    n_prunable: int
    density: float  # kept fraction of the prunable weights in the file
    zeros_forced: int  # entries the mask zeroed that were not zero in the state dict
    external_data: bool
    ort_max_abs_diff: float  # onnxruntime: sparse file vs dense model (0.0 when storage is dense)
    compact_path: Path | None = None  # the same model with sparse initializers, written when asked and smaller

    def describe(self) -> str:
        compact = f", {Path(self.compact_path).name} ({self.sparse_size_bytes / 1e6:.2f} MB)" \
            if self.compact_path else ""
        return f"{Path(self.out_path).name} ({self.size_bytes / 1e6:.2f} MB){compact}"


def export_onnx(normalized_path: str | os.PathLike, state_dict_path: str | os.PathLike | None,
                out_path: str | os.PathLike, *, masks_path: str | os.PathLike | None = None,
                storage: str = "dense", provenance: Mapping | None = None,
                compact_path: str | os.PathLike | None = None,
                preprocessing: Preprocessing | None = None) -> ExportResult:
    """`state_dict_path` None writes the normalised values unchanged (apply masks without training).
    `preprocessing`: what an image must go through to be this model's input, written into `metadata_props`
    (`force_compress.preprocessing`, `force_compress.labels`) so that the file is usable on its own.
    `compact_path`: also write the model with sparse initializers there, when that form is smaller, onnxruntime
    loads it and its outputs equal the dense model's (checked as for `storage="sparse"`)."""
    if storage not in ("dense", "sparse"):
        raise BadInputError(f"storage must be 'dense' or 'sparse', got {storage!r}")
    out_path = Path(out_path)
    model = onnx.load(str(normalized_path), load_external_data=True)
    module, param_map = load_module(normalized_path)
    if state_dict_path is None:
        state = module.state_dict()
    else:
        state = _load_state(state_dict_path)
    masks = _load_onnx_masks(masks_path) if masks_path is not None else {}

    stats = write_values(model, param_map, state, masks)
    _add_provenance(model, provenance or {})
    if preprocessing is not None:
        _set_metadata(model, preprocessing.metadata_props())

    dense_bytes = model.SerializeToString() if fits_in_protobuf(model) else None
    sparse_model, chosen = to_sparse_initializers(model, only=set(param_map.prunable_initializers))
    sparse_bytes = sparse_model.SerializeToString() if dense_bytes is not None else None
    external = dense_bytes is None
    if external and storage == "sparse":
        raise BadInputError("sparse storage of a model over 2 GB is not supported; use --storage dense")
    if storage == "sparse" and model.ir_version < 6 and chosen:
        raise BadInputError(f"sparse_initializer needs ONNX IR version >= 6 and the model has "
                            f"{model.ir_version}; use --storage dense")

    x = torch.randn((2, *_input_shape(model)), generator=torch.Generator().manual_seed(0)).numpy()
    with atomic_path(out_path) as tmp:
        if external:
            save_model(model, tmp, out_path.name)
        else:
            tmp.write_bytes(sparse_bytes if storage == "sparse" else dense_bytes)
        diff = _prove_round_trip(tmp, dense_bytes, x, sparse=storage == "sparse", n_sparse=len(chosen))
    compact = None
    if compact_path is not None and storage == "dense" and chosen and sparse_bytes is not None \
            and model.ir_version >= 6 and len(sparse_bytes) < len(dense_bytes):
        compact = Path(compact_path)
        with atomic_path(compact) as tmp:
            tmp.write_bytes(sparse_bytes)
            _prove_round_trip(tmp, dense_bytes, x, sparse=True, n_sparse=len(chosen))
    written = out_path.stat().st_size
    dense_size = len(dense_bytes) if dense_bytes is not None else written
    dense_gz = _gzip_len(dense_bytes) if dense_bytes is not None else 0
    sparse_size = len(sparse_bytes) if sparse_bytes is not None else 0
    sparse_gz = _gzip_len(sparse_bytes) if sparse_bytes is not None else 0
    return ExportResult(
        out_path=out_path, storage=storage, size_bytes=written,
        gzip_bytes=sparse_gz if storage == "sparse" else dense_gz,
        dense_size_bytes=dense_size, dense_gzip_bytes=dense_gz, sparse_size_bytes=sparse_size,
        sparse_gzip_bytes=sparse_gz, sparse_initializers=tuple(chosen),
        n_initializers_written=stats["written"], n_pruned=stats["zeros"], n_prunable=stats["prunable"],
        density=1.0 - stats["zeros"] / stats["prunable"] if stats["prunable"] else 1.0,
        zeros_forced=stats["forced"], external_data=external, ort_max_abs_diff=diff, compact_path=compact)


def write_values(model: onnx.ModelProto, param_map, state: Mapping[str, torch.Tensor],
                 masks: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Checked copy (nanoGPT's from_pretrained): every initializer of the ParamMap gets its value from
    the state dict, the import transform undone, shapes and counts compared; masked entries forced to
    exactly 0.0. Returns counts: written, prunable entries, zeros among them, zeros forced by the mask."""
    masks = dict(masks or {})
    expected = set(param_map.entries) | set(param_map.unmapped)
    missing = sorted(set(param_map.canonical.values()) - set(state))
    unknown = sorted(set(state) - expected)
    if missing or unknown:
        raise BadInputError(f"the state dict does not belong to this model: missing {missing[:3]}, "
                            f"unexpected {unknown[:3]} ({len(missing)} missing, {len(unknown)} unexpected)")
    stray = sorted(set(masks) - set(param_map.prunable_initializers))
    if stray:
        raise BadInputError(f"masks name initializers that are not prunable weights of this model: {stray[:3]}")
    inits = {t.name: t for t in model.graph.initializer}
    assert set(param_map.canonical) <= set(inits), "ParamMap names initializers the graph lacks"
    prunable = set(param_map.prunable_initializers)
    stats = {"written": 0, "prunable": 0, "zeros": 0, "forced": 0}
    for init_name, key in param_map.canonical.items():
        tensor = inits[init_name]
        dtype = numpy_helper.to_array(tensor).dtype
        value = param_map.tensor_to_onnx(key, state[key]).astype(dtype, copy=True)
        if init_name in masks:
            mask = np.asarray(masks[init_name], dtype=bool)
            if mask.shape != value.shape:
                raise BadInputError(f"mask for {init_name!r} has shape {mask.shape}, the initializer {value.shape}")
            stats["forced"] += int(np.count_nonzero(value[~mask]))
            value[~mask] = 0.0
        if init_name in prunable:
            value[value == 0] = 0.0  # -0.0 becomes +0.0: "exactly zero" in every reader
            stats["prunable"] += value.size
            stats["zeros"] += int(value.size - np.count_nonzero(value))
        doc = tensor.doc_string
        tensor.CopyFrom(numpy_helper.from_array(value, init_name))
        tensor.doc_string = doc
        stats["written"] += 1
    return stats


# ------------------------------------------------------------------------------------------------
def _prove_round_trip(path: Path, dense_bytes: bytes | None, x: np.ndarray, *, sparse: bool, n_sparse: int) -> float:
    """The written file loads, passes the checker, runs in onnxruntime; a sparse file keeps every sparse
    initializer (several onnx utilities silently drop them) and gives outputs equal to the dense model."""
    loaded = onnx.load(str(path), load_external_data=False)
    if sparse and len(loaded.graph.sparse_initializer) != n_sparse:
        raise ForceCompressError(f"sparse round trip lost initializers: wrote {n_sparse}, "
                                 f"read back {len(loaded.graph.sparse_initializer)}")
    onnx.checker.check_model(str(path))
    y = runtime.run(runtime.session(path), x)
    if not sparse or dense_bytes is None:
        return 0.0
    y_dense = runtime.run(runtime.session(dense_bytes), x)
    diff = float(np.max(np.abs(y - y_dense))) if y.size else 0.0
    if not np.array_equal(y, y_dense):
        raise ForceCompressError(f"the sparse file's onnxruntime outputs differ from the dense model's by {diff:.3g}")
    return diff


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    dims = real_inputs(model.graph)[0].type.tensor_type.shape.dim[1:]
    shape = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    if 0 in shape:  # dynamic spatial size: the parity input size is recorded at import; any valid one does
        shape = [s or 32 for s in shape]
    return tuple(shape)


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise BadInputError(f"{path}: not a readable state dict: {' '.join(str(e).split())[:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadInputError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _load_onnx_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(str(path), allow_pickle=False) as data:
            return {k: data[k].astype(bool) for k in data.files}
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not a readable mask file (.npz): {' '.join(str(e).split())[:200]}") from None


def _add_provenance(model: onnx.ModelProto, provenance: Mapping) -> None:
    try:
        tool = version("force-compress")
    except PackageNotFoundError:
        tool = "unknown"
    values = {"tool": f"force-compress {tool}", "torch": torch.__version__, "onnx": onnx.__version__,
              **{str(k): v for k, v in provenance.items()}}
    _set_metadata(model, {PROVENANCE_PREFIX + key: value if isinstance(value, str) else
                          json.dumps(value, sort_keys=True, default=str) for key, value in values.items()})


def _set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Set metadata_props entries (key → text), replacing an entry of the same key; the rest stay as they are."""
    existing = {p.key: p for p in model.metadata_props}
    for key, text in props.items():
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)


def _gzip_len(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=6))


def export_stage(graph: str, trained, masks, config, run_dir: str, data, source_sha256: str) -> ExportResult:
    """The pipeline's export: the trained weights (`trained`: TrainResult) written into `graph` (normalized.onnx, or
    cut.onnx after a channel cut) under `masks` (its `masks_path`), with provenance and the preprocessing of `data`
    in its metadata, and the compact form beside it when smaller."""
    provenance = {"source_sha256": source_sha256, "method": config.method, "sparsity": config.sparsity}
    return export_onnx(graph, trained.state_path, Path(run_dir) / RunFiles.EXPORTED, masks_path=masks.masks_path,
                       storage=config.storage, provenance=provenance, compact_path=Path(run_dir) / RunFiles.COMPACT,
                       preprocessing=describe_splits(data))


# method and sparsity: provenance in the file's metadata; the data fields and image_size: its preprocessing
STAGE = Stage("export", export_stage, reads=DATA_FIELDS | {"method", "sparsity", "storage", "image_size"},
              outputs=(RunFiles.EXPORTED,))
