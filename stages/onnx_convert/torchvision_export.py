"""A torchvision architecture at initialization exported to ONNX: how users get `resnet50.onnx` on a
machine with nothing else (no download: weights=None, seeded init).

Exporter choice, measured with torch 2.14: the TorchScript exporter (dynamo=False) with constant
folding off keeps BatchNormalization nodes (folding, and the dynamo exporter in eval mode, fuse them
into the convolutions, leaving a network that trains badly from scratch), marks the batch dynamic
without specialising size-1 dimensions, and needs no onnxscript. The dynamo exporter stays available.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import onnx
import torch

from pipeline.artifacts import atomic_path
from pipeline.errors import BadInputError

DEFAULT_OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


def export_torchvision(arch: str, out_path: str | os.PathLike, *, num_classes: int = 10,
                       input_size: tuple[int, int] = (32, 32), opset: int = DEFAULT_OPSET,
                       exporter: str = "torchscript", seed: int = 0) -> Path:
    import torchvision

    if exporter not in EXPORTERS:
        raise BadInputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = [a for a in available if arch.split("_")[0] in a][:8]
        raise BadInputError(f"unknown torchvision architecture {arch!r}; e.g. {', '.join(close or available[:8])}")
    kwargs = {"weights": None, "num_classes": num_classes}
    if arch.startswith("vit_"):
        kwargs["image_size"] = input_size[0]
    if arch in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = torchvision.models.get_model(arch, **kwargs).eval()
        except (TypeError, ValueError, AssertionError) as e:
            raise BadInputError(f"cannot build {arch} with {kwargs}: {e}") from None
    x = torch.randn(2, 3, *input_size)  # batch 2: the dynamo exporter specialises size-1 dimensions
    buf = io.BytesIO()
    try:
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), buf, dynamo=True, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], do_constant_folding=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - exporters raise many kinds of errors
        raise BadInputError(f"torch.onnx.export of {arch} failed ({exporter}, opset {opset}): "
                            f"{' '.join(str(e).split())[:300]}") from None
    model_proto = onnx.load_from_string(buf.getvalue()) if buf.getvalue() else None
    if model_proto is None:
        raise BadInputError(f"the {exporter} exporter wrote nothing for {arch}")
    for key, value in (("force_compress.exporter", f"torch.onnx.export({exporter}) opset {opset}"),
                       ("force_compress.architecture", f"torchvision.models.{arch}(num_classes={num_classes}) "
                                                       f"at init, seed {seed}"),
                       ("force_compress.input_size", f"{input_size[0]}x{input_size[1]}")):
        model_proto.metadata_props.add(key=key, value=value)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        onnx.save(model_proto, str(tmp))
    return out_path
