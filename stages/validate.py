"""Stage `validate`: measure an exported model with onnxruntime (accuracy, sparsity read from the file, parity with
torch, latency and sizes of every form), apply the gate, and write report.json, report.md and report.png.
Imports no flows/prefect/click.

Everything is measured on the file a user would deploy, never on the torch module: sparsity counts the
zeros stored in the ONNX initializers, accuracy comes from an onnxruntime session on it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline.artifacts import RunFiles, write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig
from pipeline.data import data_record
from pipeline.devices import resolve_device
from pipeline.stage import DATA_FIELDS, Stage
from stages.measure.forms import BATCHES, Form, by_role, int8_sparse_form, measure_forms
from stages.measure.gate import form_checks, gate
from stages.measure.report import ValidationReport, read_history, render_markdown, write_plot
from stages.onnx_convert import runtime
from stages.onnx_convert.costs import model_costs
from stages.onnx_convert.model_io import load_model, model_bytes
from stages.onnx_convert.scoring import classifier_io, first_images, fixed_batch, run_logits
from stages.onnx_convert.sparse_storage import densified, sparse_initializer_bytes
from stages.onnx_convert.sparsity import FileSparsity, LayerSparsity, file_sparsity
from stages.onnx_convert.to_torch import load_module

__all__ = ["STAGE", "file_sizes", "ort_vs_torch", "removed_sparsity", "validate", "validate_stage"]


def validate(
    exported_path: str | Path,
    config: CompressConfig,
    run_dir: str | Path,
    *,
    input_path: str | Path | None = None,
    normalized_path: str | Path | None = None,
    state_path: str | Path | None = None,
    history_path: str | Path | None = None,
    masks_path: str | Path | None = None,
    uncut_path: str | Path | None = None,
    compact_path: str | Path | None = None,
    int8_path: str | Path | None = None,
    int8_info: dict | None = None,
    input_scores: tuple[float, float] | None = None,
    data_info: dict | None = None,
    val,
    reference=None,
    latency_runs: int = 30,
) -> ValidationReport:
    """Measure `exported_path` and apply the gate of `config`; write report.json/md/png into `run_dir`.

    The torch side of the parity check is `reference` when given, else the module rebuilt from
    `normalized_path` with the trained `state_path` loaded (what export wrote back), else the module
    converted from the exported file itself. `val` is the held-out dataset of (image, label) pairs, the same
    split training held out. The effective
    density and cut layers come from the sidecar (masks.json) of `masks_path`, when given. `uncut_path`: the
    normalised model before a channel cut; sparsity and the costs' "input" column are then measured against it.
    `compact_path` / `int8_path`: the other forms of the model (sparse initializers, INT8), measured with the same
    code and gated too (`int8_info`: what the quantize stage reported). `input_scores`: the input's (top-1, top-5)
    on `val` when already measured (the checks before the run score it), so it is not scored again. `data_info`:
    what the report says of the data (pipeline.data.data_record).
    """
    exported_path, run_dir = Path(exported_path), Path(run_dir)
    input_path = Path(input_path or config.model)
    model = load_model(exported_path)
    _, input_shape, _ = classifier_io(model, config.image_size)

    device = resolve_device(config.device)  # onnxruntime gets CUDA only when asked for and present
    session = runtime.session(exported_path, device=device)
    provider = session.get_providers()[0]

    first_batch = first_images(val)

    sparsity = file_sparsity(model)
    if reference is None:
        reference = _reference_module(exported_path, normalized_path, state_path)
    parity_abs, parity_rel = ort_vs_torch(reference, session, first_batch)

    forms = [Form("input", input_path, input_scores), Form("fp32", exported_path)]
    forms += [Form("compact", Path(compact_path))] if compact_path else []
    int8_info = dict(int8_info or {})
    if int8_path:
        forms.append(Form("int8", Path(int8_path)))
        x = first_batch[: fixed_batch(model) or len(first_batch)]
        int8_compact, why = int8_sparse_form(Path(int8_path), run_dir / RunFiles.INT8_COMPACT, x)
        forms += [Form("int8_compact", int8_compact)] if int8_compact else []
        int8_info["int8_sparse_initializers"] = why or "onnxruntime runs it with the INT8 file's outputs"
    batches = tuple(sorted({*BATCHES, config.latency_batch}))
    measured = measure_forms(forms, val, input_shape, device=device, runs=latency_runs, batches=batches)
    roles = by_role(measured)
    top1, top5 = roles["fp32"]["top1"], roles["fp32"]["top5"]  # the exported file, scored once with the other forms
    exported_b1 = roles["fp32"]["latency_ms"]["1"]
    latency = {"input": roles["input"]["latency_ms"]["1"],
               "exported": {k: v for k, v in exported_b1.items() if k != "ratio"},
               "ratio": {**exported_b1["ratio"], "batch": 1}}
    sizes = file_sizes(input_path, exported_path, model)
    uncut = load_model(uncut_path) if uncut_path is not None else None
    costs = {"input": model_costs(uncut or load_model(input_path), input_shape).to_dict(),
             "exported": model_costs(model, input_shape).to_dict()}
    if uncut is not None:  # a channel cut: sparsity counts what is gone from the uncut model's weights
        sparsity = removed_sparsity(sparsity, file_sparsity(uncut))
    side = _masks_meta(masks_path)
    checks = gate(config, top1=top1, sparsity=sparsity, parity_rel=parity_rel, costs=costs, masks_meta=side,
                  latency=roles["fp32"]["latency_ms"]) + form_checks(config, measured)

    report = ValidationReport(
        exported_path=str(exported_path),
        report_json=str(run_dir / RunFiles.REPORT_JSON),
        report_md=str(run_dir / RunFiles.REPORT_MD),
        report_png=str(run_dir / RunFiles.REPORT_PNG),
        provider=provider,
        n_val=len(val),
        top1=top1,
        top5=top5,
        target_sparsity=target_sparsity(config, side),
        sparsity=sparsity,
        parity_max_abs=parity_abs,
        parity_max_rel=parity_rel,
        latency_ms=latency,
        sizes=sizes,
        checks=tuple(checks),
        baseline_accuracy=config.baseline_accuracy,
        structure="channel" if uncut is not None else "unstructured",
        costs=costs,
        forms=tuple(measured),
        int8=int8_info,
        data=dict(data_info or {}),
        **_from_masks_sidecar(masks_path),
    )
    history = read_history(history_path)
    write_plot(report, history, report.report_png)
    write_bytes_atomic(report.report_md, render_markdown(report, config).encode())
    write_json_atomic(report.report_json, report.to_dict())
    return report


def removed_sparsity(cut: FileSparsity, uncut: FileSparsity) -> FileSparsity:
    """The cut file's zeros counted against the uncut model: a removed channel's weights count as zeros. Layers
    keep the uncut shapes (matched by initializer name, which the cut keeps), so per-layer density is the kept
    fraction of the original layer."""
    kept = {l.name: l.numel - l.zeros for l in cut.layers}
    layers = tuple(LayerSparsity(l.name, l.op, l.shape, l.numel, l.numel - kept.get(l.name, 0)) for l in uncut.layers)
    nonzero = cut.prunable_total - cut.prunable_zeros
    params_nonzero = cut.params_total - cut.params_zeros
    return FileSparsity(layers, uncut.prunable_total, uncut.prunable_total - nonzero, uncut.params_total,
                        uncut.params_total - params_nonzero)


def _masks_meta(masks_path) -> dict:
    """masks.json beside `masks_path`, or {}."""
    side = Path(masks_path).with_suffix(".json") if masks_path else None
    return json.loads(side.read_text()) if side is not None and side.exists() else {}


def target_sparsity(config, masks_meta: dict) -> float:
    """What the run was asked to remove: --sparsity, or what the --target-latency search settled on."""
    if config.target_latency is not None and "target_sparsity" in masks_meta:
        return float(masks_meta["target_sparsity"])
    return config.sparsity


def _from_masks_sidecar(masks_path) -> dict:
    """effective_density, cut_layers, train_norm_layers and collapse_step from masks.json beside `masks_path`
    (each absent in older sidecars)."""
    meta = _masks_meta(masks_path)
    if not meta:
        return {}
    out = {"train_norm_layers": tuple(meta.get("train_norm_layers", ())), "collapse_step": meta.get("collapse_step")}
    if meta.get("structure") == "channel":
        out["channels"] = {k: meta[k] for k in ("channels_kept", "channels_total", "blocked") if k in meta}
    if "effective_density" in meta:
        out.update(effective_density=meta["effective_density"], cut_layers=tuple(meta.get("cut_layers", ())))
    return out


def file_sizes(input_path: Path, exported_path: Path, model: onnx.ModelProto) -> dict:
    """Bytes of the input file and of the exported model dense, gzipped, and with sparse initializers."""
    dense_model = densified(model)
    dense = dense_model.SerializeToString()
    sizes = {"input": model_bytes(input_path), "exported": model_bytes(exported_path),
             "dense": len(dense), "dense_gzip": len(gzip.compress(dense, compresslevel=6))}
    sparse = sparse_initializer_bytes(dense_model)
    sizes["sparse_initializers"] = len(sparse)
    sizes["sparse_initializers_gzip"] = len(gzip.compress(sparse, compresslevel=6))
    return sizes


def _reference_module(exported_path: Path, normalized_path, state_path):
    if normalized_path is not None and state_path is not None:
        module, _ = load_module(normalized_path)
        module.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    else:
        module, _ = load_module(exported_path)
    return module


def ort_vs_torch(reference, session, x: np.ndarray) -> tuple[float, float]:
    """Max abs difference between torch and onnxruntime on the same inputs, and that difference relative to
    the largest torch output (a scale-free figure the tolerance applies to)."""
    reference = reference.eval().to("cpu")
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).float().numpy()
    got = run_logits(session, x)
    diff = float(np.max(np.abs(want - got))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return diff, diff / max(scale, 1e-12)


def validate_stage(exported, trained, masks, config, run_dir: str, data, graph: str, uncut: str | None = None,
                   quantized=None, input_scores: tuple[float, float] | None = None) -> ValidationReport:
    """The pipeline's validation of an export (`exported`: ExportResult) of the training `trained` (TrainResult) on
    `graph` (normalized.onnx, or cut.onnx for a channel cut of `uncut`), with the INT8 form when `quantized`;
    `input_scores`: the input's top-1/top-5 on `data.val`, measured before the run."""
    int8_info = quantized.notes() if quantized is not None else None
    return validate(exported.out_path, config, run_dir, input_path=config.model, normalized_path=graph,
                    state_path=trained.state_path, history_path=trained.history_path, masks_path=masks.masks_path,
                    uncut_path=uncut, compact_path=exported.compact_path,
                    int8_path=quantized.out_path if quantized is not None else None, int8_info=int8_info,
                    input_scores=input_scores, val=data.val,
                    data_info={**data_record(data), "max_steps": config.max_steps})


STAGE = Stage("validate", validate_stage, outputs=(RunFiles.REPORT_JSON, RunFiles.REPORT_MD),
              reads=DATA_FIELDS | {"model", "name", "image_size", "device", "method", "sparsity", "min_accuracy",
                                   "baseline_accuracy", "max_drop", "parity_tol", "max_steps", "budget",
                                   "latency_batch", "target_latency", "weight_sparsity"})
