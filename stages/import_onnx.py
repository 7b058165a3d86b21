"""Stage `import_onnx`: check an ONNX classifier, normalise it, convert it with onnx2torch and prove
parity with onnxruntime; writes `normalized.onnx`, which every later stage rebuilds its module from.

Imports onnx, onnx2torch, torch and `pipeline`; never flows, prefect or click.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.artifacts import RunFiles, atomic_path, sha256_file
from pipeline.errors import BadInputError, ParityError, UnsupportedOperatorError
from pipeline.progress import say
from pipeline.stage import Stage
from stages.onnx_convert import runtime
from stages.onnx_convert.model_checks import (
    check_finite_weights,
    check_image_axes,
    dims_of,
    output_kind,
    softmax_warning,
)
from stages.onnx_convert.model_io import fits_in_protobuf, load_checked, save_model
from stages.onnx_convert.param_map import ParamEntry, ParamMap
from stages.onnx_convert.passes import explicit_bias, normalize
from stages.onnx_convert.passes._graph import real_inputs
from stages.onnx_convert.to_torch import to_torch

__all__ = ["STAGE", "ImportResult", "ParamEntry", "ParamMap", "import_onnx", "import_stage", "parity"]

NORMALIZED_NAME = RunFiles.NORMALIZED


@dataclass(frozen=True)
class ImportResult:
    normalized_path: Path
    source_sha256: str
    changes: tuple[str, ...]
    parity_max_abs: float
    parity_max_rel: float
    input_name: str
    input_shape: tuple[int, ...]  # without the batch dimension, concrete: (C, H, W) for images
    num_classes: int
    opset: int
    n_prunable: int  # prunable weight tensors
    n_prunable_weights: int = 0  # their entries
    output_name: str = ""
    ir_version: int = 0
    producer: str = ""
    output_kind: str = "logits"  # or "softmax" / "log_softmax": what the training loss takes the output as

    def describe(self) -> str:
        return (f"{Path(self.normalized_path).name}, opset {self.opset}, {self.n_prunable} prunable tensors, "
                f"parity {self.parity_max_abs:.1e}")


def import_onnx(model_path: str | os.PathLike, out_dir: str | os.PathLike, *, parity_tol: float = 1e-4,
                image_size: tuple[int, int] | None = None, train_norm: bool = False) -> ImportResult:
    """Check, normalise, convert and compare; nothing is written unless every step succeeds. `train_norm`:
    bias-less layers that train-time normalization will fold into get an explicit zero bias."""
    model_path = Path(model_path)
    model = load_checked(model_path)
    check_finite_weights(model)  # NaN weights would reach parity as a mere disagreement
    source_sha = sha256_file(model_path)
    source = copy.deepcopy(model)
    changes = tuple(normalize(model)) + (tuple(explicit_bias.run(model)) if train_norm else ())
    if fits_in_protobuf(model):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:  # internal: a pass broke the graph
            raise AssertionError(f"normalised model fails the checker: {e}") from e

    inp, input_shape = _input_signature(model, image_size)
    module, param_map = to_torch(model)

    out = Path(out_dir) / NORMALIZED_NAME
    with atomic_path(out) as tmp:
        save_model(model, tmp, out.name)
        try:
            max_abs, max_rel, logits = parity(module, tmp, input_shape, tol=parity_tol, source=source)
        except UnsupportedOperatorError as e:
            if not any(c.startswith("made the batch dimension") for c in changes):
                raise
            raise UnsupportedOperatorError(
                f"{model_path.name} was exported with a fixed batch size that the graph hard-codes where the import "
                f"cannot rewrite it; export it with a dynamic batch dimension ({e})") from None
        num_classes = int(logits.shape[-1])
    n_weights = sum(int(np.prod(param_map.entries[n].onnx_shape)) for n in param_map.prunable)
    kind = output_kind(model)
    if kind != "logits":
        say(softmax_warning(kind))
    return ImportResult(
        normalized_path=out, source_sha256=source_sha, changes=changes, parity_max_abs=max_abs,
        parity_max_rel=max_rel, input_name=inp.name, input_shape=input_shape, num_classes=num_classes,
        opset=_opset(model), n_prunable=len(param_map.prunable), n_prunable_weights=n_weights,
        output_name=model.graph.output[0].name, ir_version=model.ir_version, producer=model.producer_name,
        output_kind=kind)


def parity(module: nn.Module, model_path: str | os.PathLike, input_shape: tuple[int, ...], *, tol: float = 1e-4,
           source: onnx.ModelProto | None = None, batch: int = 2, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """Module in eval mode vs onnxruntime on the same random batch (batch 2: the batch is dynamic).
    Relative difference = max |torch - ort| / max |ort|. With `source` given and a fixed batch size of 1
    there, the normalised model's rows must also equal the source model run one sample at a time."""
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(seed))
    sess = runtime.session(model_path)
    y_ort = runtime.run(sess, x.numpy())
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            y_torch = module(x)
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        raise ParityError(f"the converted module fails to run on a batch of {batch}: "
                          f"{' '.join(str(e).split())[:300]}") from None
    finally:
        module.train(was_training)
    if isinstance(y_torch, (tuple, list)):
        y_torch = y_torch[0]
    y_torch = y_torch.detach().float().numpy()
    if y_torch.shape != y_ort.shape:
        raise ParityError(f"torch output shape {y_torch.shape} differs from onnxruntime's {y_ort.shape}")
    max_abs = float(np.max(np.abs(y_torch - y_ort))) if y_ort.size else 0.0
    max_rel = max_abs / max(float(np.max(np.abs(y_ort))) if y_ort.size else 0.0, 1e-12)
    if not np.isfinite(max_rel) or max_rel > tol:
        raise ParityError(f"the converted module disagrees with onnxruntime: max abs diff {max_abs:.3g}, "
                          f"relative {max_rel:.3g} > tolerance {tol:g}; raise --parity-tol if this is expected")
    if source is not None:
        _check_batch_rewrite(source, y_ort, x.numpy(), tol)
    return max_abs, max_rel, y_ort


def _check_batch_rewrite(source: onnx.ModelProto, y: np.ndarray, x: np.ndarray, tol: float) -> None:
    dims = real_inputs(source.graph)[0].type.tensor_type.shape.dim
    if not (len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1):
        return
    sess = runtime.session(source.SerializeToString() if fits_in_protobuf(source) else b"")
    rows = np.concatenate([runtime.run(sess, x[i:i + 1]) for i in range(x.shape[0])])
    diff = float(np.max(np.abs(rows - y))) / max(float(np.max(np.abs(rows))), 1e-12)
    if diff > tol:
        raise BadInputError(f"the model was exported with batch size 1 and hard-codes it somewhere the rewrite "
                            f"cannot reach (batch-2 outputs differ from one-by-one outputs by {diff:.3g}); "
                            "export it with a dynamic batch dimension")


def _input_signature(model: onnx.ModelProto, image_size) -> tuple[onnx.ValueInfoProto, tuple[int, ...]]:
    inputs = real_inputs(model.graph)
    if len(inputs) != 1:
        raise BadInputError(f"the model has {len(inputs)} inputs {[i.name for i in inputs]}; "
                            "force-compress handles single-input classifiers")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type not in (onnx.TensorProto.FLOAT,):
        raise BadInputError(f"input '{inp.name}' is {onnx.TensorProto.DataType.Name(tt.elem_type)}; "
                            "a float32 input is expected")
    check_image_axes(inp.name, dims_of(inp))
    dims = list(tt.shape.dim)[1:]
    shape: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if None in shape and image_size is not None and len(shape) >= 2:
        shape[-2:] = [shape[-2] or int(image_size[0]), shape[-1] or int(image_size[1])]
    if None in shape or not shape:
        raise BadInputError(f"input '{inp.name}' has unknown non-batch dimensions {shape}; "
                            "give the input size (--image-size H W)")
    return inp, tuple(int(s) for s in shape)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def import_stage(model_path: str, run_dir: str, config) -> ImportResult:
    """The pipeline's import: `model_path` normalised into `run_dir` under the config's import options."""
    return import_onnx(model_path, run_dir, parity_tol=config.parity_tol, image_size=config.image_size,
                       train_norm=config.train_norm)


STAGE = Stage("import", import_stage, reads=frozenset({"image_size", "parity_tol", "train_norm"}),
              outputs=(RunFiles.NORMALIZED,))
