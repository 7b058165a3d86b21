"""OpenVINO as the second runtime of every published form: users deploy the files we publish on runtimes other
than onnxruntime, and OpenVINO reads no sparse initializers ("Input tensor isn't found for node ..."). Each form is
compiled for OpenVINO's CPU plugin (float32 precision, so that its top-1 compares with onnxruntime's rather than
with bf16 rounding) and scored on the same held-out split; a form it cannot read or scores differently is
onnxruntime-only, and the manifest and the report say so. Where OpenVINO is not installed, a form holding sparse
initializers is marked onnxruntime-only by that rule (what OpenVINO was measured to refuse) and the record says it
was not checked. Imports no flows/prefect/click."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

SPARSE_RULE = "holds sparse initializers, which OpenVINO does not read"


class _Compiled:
    """An OpenVINO compiled model with the two calls of an onnxruntime session that scoring makes."""

    class _Input:
        def __init__(self, port) -> None:
            self.name = port.get_any_name()
            dims = port.get_partial_shape()
            self.shape = [d.get_length() if d.is_static else "N" for d in dims]

    def __init__(self, compiled) -> None:
        self._compiled = compiled
        self._inputs = [self._Input(p) for p in compiled.inputs]

    def get_inputs(self):
        return self._inputs

    def run(self, _outputs, feeds: dict) -> list[np.ndarray]:
        result = self._compiled(feeds)
        return [np.asarray(result[self._compiled.outputs[0]])]


def compile_openvino(path: Path) -> tuple[_Compiled | None, dict | None]:
    """(the form compiled for OpenVINO's CPU plugin, to be scored with the others, None) or (None, the record of a
    form it does not read or could not check)."""
    try:
        import openvino as ov
    except ImportError:
        sparse = len(onnx.load(str(path), load_external_data=False).graph.sparse_initializer) > 0
        return None, {"checked": False, "reads": False if sparse else None,
                      "why": SPARSE_RULE if sparse else "OpenVINO is not installed here: not checked"}
    try:
        return _Compiled(ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})), None
    except Exception as e:  # noqa: BLE001 - whatever OpenVINO raises, it does not read this file
        return None, {"checked": True, "reads": False, "why": _reason(e)}


def scored_record(scores: tuple[float, float], ort_top1: float, n_images: int) -> dict:
    """The record of a form OpenVINO read and scored (`scores`: its top-1, top-5); `same_top1` allows one image of
    `n_images` (float32 sums in another order can flip a near tie)."""
    import openvino as ov

    top1, top5 = scores
    same = abs(top1 - ort_top1) <= 1.0 / max(n_images, 1) + 1e-9
    return {"checked": True, "reads": True, "top1": top1, "top5": top5, "same_top1": same, "version": ov.__version__,
            "why": "" if same else f"top-1 {top1:.4f} in OpenVINO, {ort_top1:.4f} in onnxruntime"}


def _reason(e: BaseException) -> str:
    """OpenVINO's own words: the last line of its message (the first ones name its source files)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Exception from", "Check"))]
    return (lines[-1] if lines else type(e).__name__)[:200]


def onnxruntime_only(record: dict) -> bool:
    """A form whose OpenVINO record says it is not read, or read with another top-1."""
    return record.get("reads") is False or record.get("same_top1") is False
