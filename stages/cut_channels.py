"""Stage `cut_channels`: remove the pruned channels from the normalised ONNX graph and prove, before any
training, that the smaller graph computes what the masked full graph computes (onnxruntime on real images).
Writes `cut.onnx`, which training, export and validation then use as their graph, and `cut_masks.npz`: masks
over the cut model's weights with everything kept (the cut network trains dense). Imports no flows/prefect/click.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

import force_core
from pipeline.artifacts import RunFiles, atomic_path
from pipeline.errors import BadInputError, ParityError
from pipeline.stage import DATA_FIELDS, Stage
from stages.onnx_convert import runtime
from stages.onnx_convert.channels import Plan, analyze, cut_channels, keep_arrays, mask_channels
from stages.onnx_convert.costs import model_costs
from stages.onnx_convert.mask_file import save_masks
from stages.onnx_convert.to_torch import load_module

__all__ = ["CUT_NAME", "STAGE", "CutResult", "cut_graph", "cut_stage"]

CUT_NAME = RunFiles.CUT
PROOF_IMAGES = 32  # training images the cut is proven on


@dataclass(frozen=True)
class CutResult:
    cut_path: Path
    masks_path: Path  # all-kept masks over the cut model's prunable weights
    parity_max_abs: float
    parity_max_rel: float
    channels_kept: int
    channels_total: int
    costs_before: dict
    costs_after: dict

    def describe(self) -> str:
        before, after = self.costs_before, self.costs_after
        return (f"{self.channels_kept} of {self.channels_total} channels kept; parameters {before['params']:,} → "
                f"{after['params']:,}, MACs {before['macs'] / 1e6:,.1f}M → {after['macs'] / 1e6:,.1f}M; "
                f"parity with the masked model {self.parity_max_rel:.1e}")


def cut_graph(normalized_path: str | os.PathLike, masks_path: str | os.PathLike, out_dir: str | os.PathLike, *,
              images: np.ndarray, parity_tol: float = 1e-4, plan: Plan | None = None) -> CutResult:
    """Cut the channels that masks.json (beside `masks_path`) does not keep out of `normalized_path`; `images`
    (N, C, H, W) are the inputs the cut is proven on. `plan`: the graph's channel analysis when the masks came with
    it (else it is analysed here). Nothing is written unless the proof holds."""
    normalized_path, out_dir = Path(normalized_path), Path(out_dir)
    meta = json.loads(Path(masks_path).with_suffix(".json").read_text())
    if meta.get("structure") != "channel":
        raise BadInputError(f"{masks_path}: not channel masks (structure {meta.get('structure')!r})")
    model = onnx.load(str(normalized_path))
    plan = plan or analyze(model)
    analysis = plan.analysis
    keep = _keep_arrays(analysis, meta, masks_path)
    cut = cut_channels(model, analysis, keep, plan=plan)
    masked = mask_channels(model, analysis, keep)
    x = np.ascontiguousarray(images, dtype=np.float32)
    want = runtime.run(runtime.session(masked.SerializeToString()), x)
    got = runtime.run(runtime.session(cut.SerializeToString()), x)
    diff = float(np.max(np.abs(want - got)))
    rel = diff / max(float(np.max(np.abs(want))), 1e-12)
    if not rel <= parity_tol:  # NaN fails too
        raise ParityError(
            f"the channel cut changes {normalized_path.name}'s outputs (max relative difference {rel:.2e} vs "
            f"tolerance {parity_tol:.0e} against the masked model): this graph cannot be cut exactly; "
            "use --structure unstructured")
    input_shape = tuple(int(v) for v in x.shape[1:])
    out = out_dir / CUT_NAME
    with atomic_path(out) as tmp:
        onnx.save(cut, str(tmp))
    cut_masks = _all_kept_masks(out, out_dir / RunFiles.CUT_MASKS, meta)
    return CutResult(cut_path=out, masks_path=cut_masks, parity_max_abs=diff, parity_max_rel=rel,
                     channels_kept=int(meta["channels_kept"]), channels_total=int(meta["channels_total"]),
                     costs_before=model_costs(model, input_shape).to_dict(),
                     costs_after=model_costs(cut, input_shape).to_dict())


def _keep_arrays(analysis, meta: dict, masks_path) -> dict[str, np.ndarray]:
    """masks.json's kept channel indices as boolean arrays, checked against this graph's groups."""
    sizes = {g.name: g.size for g in analysis.groups}
    recorded = meta.get("channel_sizes", {})
    if any(sizes.get(name) != size for name, size in recorded.items()):
        raise BadInputError(f"{masks_path}: channel masks computed for another graph (channel groups differ)")
    return keep_arrays(sizes, meta["channels"])


def _all_kept_masks(cut_path: Path, out: Path, meta: dict) -> Path:
    module, param_map = load_module(cut_path)
    params = dict(module.named_parameters())
    masks = force_core.MaskSet({n: torch.ones_like(params[n], dtype=torch.bool) for n in param_map.prunable})
    side = {"method": meta.get("method"), "structure": "channel", "cut": True,
            "note": "the cut network trains dense: every remaining weight is kept"}
    path, _, _ = save_masks(out, masks, param_map, side)
    return path


def cut_stage(normalized_path: str, masks, run_dir: str, config, data) -> CutResult:
    """The pipeline's cut of `normalized_path` by the channel masks `masks` (MaskResult, with the channel analysis
    they were computed on), proven on the first training images of the run's data (never the held-out split)."""
    images, _ = data.train_plain.batch(torch.arange(min(PROOF_IMAGES, len(data.train_plain))))
    return cut_graph(normalized_path, masks.masks_path, run_dir, images=images.numpy(), parity_tol=config.parity_tol,
                     plan=masks.channel_plan)


STAGE = Stage("cut", cut_stage, reads=DATA_FIELDS | {"parity_tol"}, outputs=(RunFiles.CUT, RunFiles.CUT_MASKS))
