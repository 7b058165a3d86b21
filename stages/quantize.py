"""Stage `quantize`: static INT8 quantization of the exported FP32 model with onnxruntime's own quantizer (QDQ
format, weights per channel and symmetric so that a pruned 0.0 stays exactly 0), calibrated on training images
only. Writes `model.int8.onnx`; validation then measures it like every other artifact. Imports no flows/prefect/click.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline.artifacts import RunFiles, atomic_path
from pipeline.errors import BadInputError
from pipeline.stage import DATA_FIELDS, Stage
from stages.onnx_convert.passes._graph import real_inputs
from stages.onnx_convert.scoring import fixed_batch

__all__ = ["INT8_NAME", "QUANTIZED_OPS", "STAGE", "QuantizeResult", "check_not_quantized", "cpu_int8_features",
           "quantize_int8", "quantize_stage"]

INT8_NAME = RunFiles.INT8
CALIBRATION_IMAGES = 256
# Operators that mean a model is quantized already (QDQ pairs, QOperator kernels, integer matmuls).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "ConvInteger", "MatMulInteger"})


@dataclass(frozen=True)
class QuantizeResult:
    out_path: Path
    fp32_nodes: tuple[str, ...]  # "name (op)" of compute nodes the quantizer left in FP32
    calibration_images: int
    reduce_range: bool  # 7-bit weights, as onnxruntime advises on x86 CPUs without VNNI
    cpu_features: dict

    def notes(self) -> dict:
        """What validation reports of the quantization (everything but the file)."""
        return {"fp32_nodes": self.fp32_nodes, "calibration_images": self.calibration_images,
                "reduce_range": self.reduce_range, "cpu_features": self.cpu_features}

    def describe(self) -> str:
        left = f", {len(self.fp32_nodes)} node(s) left in FP32" if self.fp32_nodes else ""
        return f"{Path(self.out_path).name} ({Path(self.out_path).stat().st_size / 1e6:.2f} MB){left}"


def check_not_quantized(model: onnx.ModelProto, what: str) -> None:
    """BadInputError (exit 2) when `model` holds quantized operators: quantizing it again is not possible."""
    node = next((n for n in model.graph.node if n.op_type in QUANTIZED_OPS), None)
    if node is not None:
        raise BadInputError(f"{what} is already quantized ({node.op_type} node {node.name or node.output[0]!r}); "
                            "drop --quantize int8")


def cpu_int8_features() -> dict:
    """Which x86 INT8 dot-product instructions this CPU reports (Linux /proc/cpuinfo; others: unknown)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return {"known": False}
    return {"known": True, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags, "avx2": "avx2" in flags}


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: np.ndarray, *,
                  batch: int = 32) -> QuantizeResult:
    """Quantize `fp32_path` to INT8 QDQ (activations uint8 asymmetric, weights int8 symmetric per channel),
    calibrated with MinMax on `images` (N, C, H, W; training images, never the held-out split)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    model = onnx.load(str(fp32_path), load_external_data=False)
    check_not_quantized(model, fp32_path.name)
    graph_input = real_inputs(model.graph)[0]
    step = fixed_batch(model) or batch
    feeds = [images[i : i + step] for i in range(0, len(images) - step + 1, step)] or [images[:step]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter({graph_input.name: np.ascontiguousarray(x, dtype=np.float32)} for x in feeds)

        def get_next(self):
            return next(self._it, None)

    features = cpu_int8_features()
    vnni = features.get("avx512_vnni") or features.get("avx_vnni") or features.get("amx_int8")
    reduce_range = bool(features.get("known")) and not vnni  # onnxruntime's advice for x86 without VNNI
    with tempfile.TemporaryDirectory(prefix="fc-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - the pre-pass is an optimisation; quantize the file as it is
            prepared = fp32_path
        with atomic_path(out_path) as dest:
            quantize_static(str(prepared), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=reduce_range, extra_options={"WeightSymmetric": True})
    quantized = onnx.load(str(out_path), load_external_data=False)
    return QuantizeResult(out_path=out_path, fp32_nodes=tuple(fp32_compute_nodes(quantized)),
                          calibration_images=sum(len(f) for f in feeds), reduce_range=reduce_range,
                          cpu_features=features)


def fp32_compute_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of a QDQ model that compute in FP32: a float output, and not the quantized pattern (an input from a
    DequantizeLinear, every output read only by QuantizeLinear), which onnxruntime runs with an INT8 kernel."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    outputs = {o.name for o in model.graph.output}
    left = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or not any(types.get(o) in floats for o in n.output):
            continue
        quantized = any(i in dequantized for i in n.input) and all(
            o not in outputs and readers.get(o, set()) == {"QuantizeLinear"} for o in n.output)
        if not quantized:
            left.append(f"{n.name or n.output[0]} ({n.op_type})")
    return left


def quantize_stage(exported, run_dir: str, data) -> QuantizeResult:
    """The pipeline's INT8 form of the export (`exported`: ExportResult), calibrated on a seeded draw of training
    images, never the held-out split."""
    n = min(CALIBRATION_IMAGES, len(data.train))
    images, _ = data.train.batch(torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:n])
    return quantize_int8(exported.out_path, Path(run_dir) / RunFiles.INT8, images.numpy())


STAGE = Stage("quantize", quantize_stage, reads=DATA_FIELDS, outputs=(RunFiles.INT8,))
