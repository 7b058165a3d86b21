"""`force-compress predict`: classify image files with a published model on its own (its directory or an .onnx
file carrying pipeline.preprocessing's metadata), on onnxruntime's CPU provider. Imports onnx, onnxruntime and
pipeline; never stages or flows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import BadInputError, InvalidModelError
from pipeline.preprocessing import Preprocessing, load_image

__all__ = ["Prediction", "predict", "resolve_model"]

_BATCH = 64


@dataclass(frozen=True)
class Prediction:
    image: str
    top: tuple[tuple[str, int, float], ...]  # (label, output index, probability), most probable first

    def to_dict(self) -> dict:
        return {"image": self.image,
                "top": [{"label": label, "index": i, "probability": p} for label, i, p in self.top]}


def resolve_model(path: str | os.PathLike, model_file: str) -> Path:
    """A registry version directory means its primary file `model_file`; anything else is the .onnx file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / model_file
    if not p.is_file():
        raise BadInputError(f"model not found: {p} (give a registry version directory or an .onnx file)")
    return p


def predict(model: str | os.PathLike, images: Sequence[str | os.PathLike], top: int = 5) -> list[Prediction]:
    """Top-`top` labels with softmax probabilities for each image of the ONNX file `model`, in the order given. Every
    image is read and checked before the model runs, so a bad one stops the call with BadInputError naming it."""
    import onnx
    import onnxruntime as ort

    path = Path(model)
    if not path.is_file():
        raise BadInputError(f"model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, OSError, ValueError… for a bad file
        raise InvalidModelError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    prep = Preprocessing.from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
    x = np.stack([load_image(f, prep) for f in images]).astype(np.float32, copy=False)

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error, in one line
        raise InvalidModelError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from None
    inp = session.get_inputs()[0]
    want = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape[1:])
    if any(d is not None and d != s for d, s in zip(want, prep.input_size, strict=False)):
        raise BadInputError(f"{path}: the recorded input size {prep.input_size} does not fit the model's input "
                            f"{inp.name} {inp.shape}")
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    logits = _run(session, inp.name, x, fixed or _BATCH, pad=fixed is not None)

    z = logits.astype(np.float64)
    prob = np.exp(z - z.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    k = min(int(top), prob.shape[1])
    out = []
    for f, p in zip(images, prob, strict=True):
        order = np.argsort(-p, kind="stable")[:k]  # ties: the lower index first, as argmax
        out.append(Prediction(str(f), tuple((_label(prep, int(i)), int(i), float(p[i])) for i in order)))
    return out


def _label(prep: Preprocessing, index: int) -> str:
    return prep.labels[index] if index < len(prep.labels) else str(index)


def _run(session, name: str, x: np.ndarray, batch: int, *, pad: bool) -> np.ndarray:
    """Logits (N, classes) in batches of `batch`; a model with a fixed batch gets its last batch padded."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if pad and n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        y = session.run(None, {name: chunk})[0]
        out.append(np.asarray(y).reshape(len(chunk), -1)[:n])
    return np.concatenate(out)
