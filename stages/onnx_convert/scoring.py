"""A classifier as onnxruntime sees it, one reader each: its input signature (`classifier_io`), the batch size its
input hard-codes (`fixed_batch`), its logits over a batch of any size (`run_logits`) and its top-1/top-5 on a data
set (`accuracy`). Validation, the model forms, the INT8 calibration and export all read the model through these."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from pipeline.data import make_loader
from pipeline.errors import BadInputError
from pipeline.files import scoring_batch
from pipeline.progress import Progress
from stages.onnx_convert import runtime
from stages.onnx_convert.model_checks import check_image_axes, dims_of
from stages.onnx_convert.passes._graph import real_inputs

EMPTY_SPLIT = "the held-out split is empty; raise --val-fraction or give more data"


def classifier_io(model: onnx.ModelProto, image_size: Sequence[int] | None = None) -> tuple[str, tuple, int]:
    """(input name, (C, H, W), number of classes) of a single-image-input classifier; a dynamic H/W comes
    from `image_size`, a dynamic class count from one onnxruntime run on zeros."""
    inputs = real_inputs(model.graph)
    if len(inputs) != 1:
        raise BadInputError(f"expected a classifier with one image input, got inputs {[i.name for i in inputs]}")
    if len(model.graph.output) != 1:
        raise BadInputError(f"expected a classifier with one output (the logits), got outputs "
                            f"{[o.name for o in model.graph.output]}; export the model with its logits only")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise BadInputError(f"model input {inputs[0].name!r} has shape {dims}; expected (N, C, H, W) images")
    check_image_axes(inputs[0].name, dims_of(inputs[0]))
    c, h, w = dims[1:]
    if image_size is not None:
        if h is not None and w is not None and (h, w) != tuple(int(v) for v in image_size):
            raise BadInputError(f"model input {inputs[0].name!r} is fixed at {h}x{w}; --image-size applies "
                                f"only to models with a dynamic size (got {image_size[0]} {image_size[1]})")
        h, w = (int(v) for v in image_size)
    if c is None or h is None or w is None:
        raise BadInputError(f"model input {inputs[0].name!r} has a dynamic size {dims}; pass --image-size H W")
    out = model.graph.output[0].type.tensor_type.shape.dim
    num_classes = out[-1].dim_value if len(out) and out[-1].HasField("dim_value") else 0
    if not num_classes:
        session = runtime.session(model.SerializeToString())
        x = np.zeros((dims[0] or 1, c, h, w), np.float32)
        num_classes = int(session.run(None, {inputs[0].name: x})[0].shape[-1])
    return inputs[0].name, (int(c), int(h), int(w)), int(num_classes)


def fixed_batch(model_or_session) -> int | None:
    """The batch size the input of an ONNX model (ModelProto) or an onnxruntime session hard-codes; None when it
    is dynamic."""
    if isinstance(model_or_session, onnx.ModelProto):
        d0 = real_inputs(model_or_session.graph)[0].type.tensor_type.shape.dim[0]
        return d0.dim_value if d0.HasField("dim_value") and d0.dim_value > 0 else None
    d0 = model_or_session.get_inputs()[0].shape[0]
    return d0 if isinstance(d0, int) and d0 > 0 else None


def run_logits(session, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    """The session's first output on `x`; a model with a fixed batch runs in chunks of it, the last one padded."""
    name = session.get_inputs()[0].name
    batch = batch or fixed_batch(session)
    if batch is None:
        return session.run(None, {name: x})[0]
    outs = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {name: chunk})[0][: batch - pad])
    return np.concatenate(outs)


def numpy_batches(dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images float32, labels) of `dataset` in order, `batch_size` at a time (a streamed set read by its DataLoader
    workers, never whole)."""
    if hasattr(dataset, "batches"):  # pipeline.data's image sets, in memory or streamed
        for x, y in make_loader(dataset, batch_size, shuffle=False):
            yield x.numpy().astype(np.float32, copy=False), y.numpy()
        return
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = np.stack([np.asarray(it[0], dtype=np.float32) for it in items])
        y = np.asarray([int(it[1]) for it in items])
        yield x, y


def first_images(dataset, n: int = 16) -> np.ndarray:
    """The first `n` images of `dataset` (what parity compares on)."""
    if len(dataset) == 0:
        raise BadInputError(EMPTY_SPLIT)
    return next(numpy_batches(dataset, n))[0]


def accuracy(session, dataset, batch_size: int | None = None) -> tuple[float, float]:
    """Top-1 and top-5 of `session` on `dataset` (in batches of a bounded size: see scoring_batch)."""
    return accuracies([session], dataset, batch_size)[0]


def accuracies(sessions, dataset, batch_size: int | None = None) -> list[tuple[float, float]]:
    """(top-1, top-5) of each session (onnxruntime, or anything with its `get_inputs` and `run`) on `dataset`, in one
    pass over it: a streamed held-out split is read and decoded once for all of them."""
    if len(dataset) == 0:
        raise BadInputError(EMPTY_SPLIT)
    shape = getattr(dataset, "shape", None)
    batch_size = batch_size or (scoring_batch(shape) if shape else 256)
    hits = np.zeros((len(sessions), 2), dtype=np.int64)
    n = 0
    progress = Progress("scoring", math.ceil(len(dataset) / batch_size), len(dataset))
    for x, y in numpy_batches(dataset, batch_size):
        progress.update(1, len(y))
        for k, session in enumerate(sessions):
            logits = run_logits(session, x)
            topk = np.argsort(-logits, axis=1, kind="stable")[:, :min(5, logits.shape[1])]
            hits[k] += (int((topk[:, 0] == y).sum()), int((topk == y[:, None]).any(axis=1).sum()))
        n += len(y)
    progress.close()
    if n == 0:
        raise BadInputError("no held-out image could be read; see the unreadable images named above")
    return [(int(h1) / n, int(h5) / n) for h1, h5 in hits]


def onnx_accuracy(model_path: str | os.PathLike | Path, dataset, *, device="cpu",
                  threads: int | None = None) -> tuple[float, float]:
    """Top-1 and top-5 of an ONNX classifier under onnxruntime on `dataset` (what the gate scores)."""
    return accuracy(runtime.session(model_path, device=device, threads=threads), dataset)
