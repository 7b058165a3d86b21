"""Every form of one compressed model measured the same way: the input, the dense FP32 export (every runtime
reads it), the compact FP32 file (sparse initializers), the INT8 file and, when onnxruntime reads it, the INT8 file
with sparse initializers. Size, gzip size, sha256, top-1/top-5 on the held-out split, sparsity read from the file
and latency p50/p90 at batch 1 and 32, all forms timed in the same interleaved rounds, and whether OpenVINO reads
each published form with the same top-1 (second_runtime). One table; the gate's checks for the extra forms.
Imports no flows/prefect/click."""

from __future__ import annotations

import gc
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline.artifacts import atomic_path, sha256_file
from stages.measure.latency import interleaved_latency
from stages.measure.second_runtime import compile_openvino, onnxruntime_only, scored_record
from stages.onnx_convert import runtime
from stages.onnx_convert.model_io import model_bytes
from stages.onnx_convert.scoring import accuracies
from stages.onnx_convert.sparse_storage import to_sparse_initializers
from stages.onnx_convert.sparsity import file_sparsity

__all__ = ["FORM_LABELS", "Form", "by_role", "int8_sparse_form", "measure_forms"]

FORM_LABELS = {"input": "input model", "fp32": "dense FP32 (primary)", "compact": "FP32, sparse initializers",
               "int8": "INT8 (QDQ)", "int8_compact": "INT8, sparse initializers"}
BATCHES = (1, 32)


@dataclass(frozen=True)
class Form:
    role: str  # a key of FORM_LABELS
    path: Path
    scores: tuple[float, float] | None = None  # (top-1, top-5) on the same held-out split, when already measured


def measure_forms(forms: list[Form], val, input_shape: tuple, *, device: str = "cpu", runs: int = 30,
                  batches: tuple[int, ...] = BATCHES) -> list[dict]:
    """One record per form (in the order given; the first is the reference of the latency ratios), timed at each of
    `batches`."""
    sessions = [runtime.timed_session(f.path, device=device) for f in forms]
    # what we publish also goes through the second runtime; every form still unscored is scored in one pass
    openvino = {i: compile_openvino(f.path) for i, f in enumerate(forms) if f.role != "input"}
    scored = [(i, s) for i, (f, s) in enumerate(zip(forms, sessions, strict=True)) if f.scores is None]
    scored += [(i, compiled) for i, (compiled, _) in openvino.items() if compiled is not None]
    results = accuracies([s for _, s in scored], val) if scored else []
    ort_scores = {i: r for (i, s), r in zip(scored, results, strict=True) if s is sessions[i]}
    ov_scores = {i: r for (i, s), r in zip(scored, results, strict=True) if s is not sessions[i]}
    # OpenVINO keeps the buffers of the largest batch it ran for as long as the compiled model lives (halonet_h1 at
    # 256×256: GBs each); only its scores are needed from here on
    openvino = {i: (None, info) for i, (_, info) in openvino.items()}
    del scored
    gc.collect()
    records = []
    for i, form in enumerate(forms):
        model = onnx.load(str(form.path), load_external_data=False)
        top1, top5 = form.scores or ort_scores[i]
        sparsity = file_sparsity(model, form.path.parent)
        data = form.path.read_bytes()
        records.append({"role": form.role, "file": form.path.name, "path": str(form.path),
                        "size": model_bytes(form.path),  # external data counts
                        "gzip_size": len(gzip.compress(data, compresslevel=6)), "sha256": sha256_file(form.path),
                        "top1": top1, "top5": top5, "prunable_zeros": sparsity.prunable_zeros,
                        "prunable_total": sparsity.prunable_total, "latency_ms": {}})
        if i in openvino:  # does the second runtime read it, with the same top-1?
            ov = scored_record(ov_scores[i], top1, len(val)) if i in ov_scores else openvino[i][1]
            records[-1].update(openvino=ov, onnxruntime_only=onnxruntime_only(ov))
    for batch in batches:
        timed = interleaved_latency(sessions, input_shape, batch=batch, runs=runs, budget_s=8.0)
        for record, t in zip(records, timed, strict=True):
            record["latency_ms"][str(batch)] = t
    return records


def int8_sparse_form(int8_path: Path, out_path: Path, x: np.ndarray) -> tuple[Path | None, str]:
    """The INT8 model with its int8 weights as sparse initializers, kept when smaller and onnxruntime loads it and
    gives the INT8 file's outputs; otherwise (None, why)."""
    model = onnx.load(str(int8_path))
    sparse, chosen = to_sparse_initializers(model, dtypes=(onnx.TensorProto.INT8,))
    if not chosen:
        return None, "no int8 weight is smaller stored sparse"
    data = sparse.SerializeToString()
    if len(data) >= int8_path.stat().st_size:
        return None, "not smaller than the INT8 file"
    try:
        got = runtime.run(runtime.session(data), x)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error, reported in one line
        return None, f"onnxruntime cannot run it ({' '.join(str(e).split())[:160]})"
    want = runtime.run(runtime.session(int8_path), x)
    if not np.array_equal(got, want):
        return None, f"onnxruntime's outputs differ from the INT8 file's by {float(np.max(np.abs(got - want))):.3g}"
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    return out_path, ""


def by_role(forms) -> dict[str, dict]:
    """The measured forms keyed by role ("input", "fp32", ...)."""
    return {f["role"]: f for f in forms}
