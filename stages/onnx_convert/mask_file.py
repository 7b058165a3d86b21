"""The mask file (DESIGN.md): `masks.npz`, one boolean array per pruned ONNX initializer keyed by its name, and the
`masks.json` sidecar. Users and other tools read them without this package; here they go to and from a MaskSet keyed
by the converted module's parameter names (through the ParamMap)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import force_core
from pipeline.artifacts import atomic_path, write_json_atomic
from pipeline.errors import BadInputError
from stages.onnx_convert.param_map import ParamMap


def save_masks(out_path: str | os.PathLike, maskset, param_map: ParamMap, meta: dict) -> tuple[Path, Path, dict]:
    """Write masks.npz (initializer name -> bool array in the initializer's layout) and the sidecar."""
    out_path = Path(out_path)
    arrays = {param_map.to_initializer(n): param_map.mask_to_onnx(n, m) for n, m in maskset.items()}
    kept = {k: int(np.count_nonzero(v)) for k, v in arrays.items()}
    sizes = {k: int(v.size) for k, v in arrays.items()}
    total = sum(sizes.values())
    summary = {
        **meta, "total": total, "kept_total": sum(kept.values()),
        "density": sum(kept.values()) / total if total else 1.0, "kept": kept, "sizes": sizes,
        "disconnected": [k for k, v in kept.items() if v == 0], "keyed_by": "onnx initializer name",
    }
    with atomic_path(out_path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    meta_path = write_json_atomic(out_path.with_suffix(".json"), summary)
    return out_path, meta_path, summary


def load_masks(masks_path: str | os.PathLike, param_map: ParamMap) -> force_core.MaskSet:
    """masks.npz (initializer names) -> MaskSet keyed by the module's parameter names."""
    masks_path = Path(masks_path)
    try:
        with np.load(str(masks_path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise BadInputError(f"{masks_path}: not a readable mask file: {' '.join(str(e).split())[:200]}") from None
    unknown = sorted(set(arrays) - set(param_map.prunable_initializers))
    if unknown:
        raise BadInputError(f"{masks_path}: masks for initializers that are not prunable weights of this model: "
                            f"{unknown[:3]} (computed for another model?)")
    try:
        masks = param_map.masks_from_onnx(arrays)
    except ValueError as e:
        raise BadInputError(f"{masks_path}: {e}") from None
    side = masks_path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.exists() else {}
    meta = {k: v for k, v in meta.items() if k not in ("kept", "sizes", "effective_kept")}
    return force_core.MaskSet(masks, meta)


def effective_sidecar(effective: force_core.EffectiveSparsity, param_map: ParamMap) -> dict:
    """The sidecar's effective-sparsity entries, keyed by initializer name like `kept`."""
    return {"effective_kept": {param_map.to_initializer(n): k for n, k in effective.effective_kept.items()},
            "effective_kept_total": effective.effective_kept_total, "effective_density": effective.effective_density,
            "cut_layers": [param_map.to_initializer(n) for n in effective.cut_layers]}
