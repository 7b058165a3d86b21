"""What a model trained here expects of an image, recorded with the model so a published file is usable on its own:
layout and input size, resize, colour, value range, the training split's per-channel mean/std, and the class labels
in index order. Export writes it into the ONNX file's `metadata_props`, publish repeats it in the manifest, and
`force-compress predict` applies it to image files (pipeline.predict). Imports numpy and, where images are handled,
pipeline.data (torch, PIL); never stages or flows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import BadInputError, DataError

if TYPE_CHECKING:  # pipeline.data (torch) loads only where images are: reading the record stays light (publish)
    from pipeline.data import DataSplits

__all__ = ["LABELS_KEY", "PREPROCESSING_KEY", "Preprocessing", "describe_splits", "load_image", "normalization"]

PREPROCESSING_KEY = "force_compress.preprocessing"  # metadata_props keys; values are JSON
LABELS_KEY = "force_compress.labels"
FORMAT = 1  # the preprocessing record's version: a reader refuses a newer one
# Where a run's mean/std came from, first that applies: the options, the input file's own record, the data.
NORMALIZATION_FROM_OPTIONS = "--mean/--std"
NORMALIZATION_FROM_MODEL = "the input model's force_compress.preprocessing metadata"
NORMALIZATION_FROM_DATA = "the training split"

# The two resize paths of pipeline.data, described for a reader that re-implements them without this package.
_RESIZE = {
    "torch": {"library": "torch", "method": "bilinear", "align_corners": False, "antialias": "when shrinking",
              "order": "scale to [0, 1], resize (torch.nn.functional.interpolate), clamp to [0, 1], map channels",
              "channels": "grey repeated to 3; RGB to grey by BT.601 luma (0.299, 0.587, 0.114); alpha dropped"},
    "pillow": {"library": "pillow", "method": "bilinear",
               "order": "PIL convert to the colour mode (L or RGB), resize the 8-bit image (Image.BILINEAR), "
                        "then / 255",
               "channels": "PIL convert('L') (ITU-R 601-2 luma) or convert('RGB'); alpha dropped"},
}
# How `load_image` (predict) scales a file to [0, 1] before the resize path; training's sources say their own `scale`.
_IMAGE_FILES = ("8-bit / 255, 16-bit / 65535; .npy arrays: uint8 / 255, other types as stored (/ 255 when above 1.5)"
                "; grey files stay one channel, colour ones RGB, before the channel mapping")
_GREY_MODES = ("1", "L", "LA", "La")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: (C, H, W) float32 in [0, 1] after scaling and resizing, then
    (x - mean) / std per channel, NCHW. `labels[i]` names output i (fewer labels than outputs: the rest go by
    index)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    resize: str = "torch"  # "torch" | "pillow": which of pipeline.data's paths the training images took
    scale: str = "8-bit / 255"  # how the source's stored values became [0, 1]
    source: str = ""
    normalization: str = NORMALIZATION_FROM_DATA  # where mean/std came from (pipeline.preprocessing.normalization)

    @property
    def colour(self) -> str:
        return {1: "grayscale", 3: "RGB"}.get(self.input_size[0], f"{self.input_size[0]} channels")

    def to_dict(self) -> dict:
        """The JSON record (metadata `force_compress.preprocessing`, manifest `preprocessing`)."""
        return {
            "format": FORMAT, "layout": "NCHW", "input_size": list(self.input_size), "colour": self.colour,
            "value_range": [0.0, 1.0], "scale": self.scale, "image_files": _IMAGE_FILES,
            "resize": _RESIZE[self.resize],
            "mean": list(self.mean), "std": list(self.std), "normalize": "(x - mean) / std, per channel",
            "normalization_from": self.normalization, "source": self.source,
        }

    def metadata_props(self) -> dict[str, str]:
        return {PREPROCESSING_KEY: json.dumps(self.to_dict()), LABELS_KEY: json.dumps(list(self.labels))}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], what: str = "the model") -> Preprocessing:
        """Read it back from metadata_props; BadInputError (exit 2) when it is absent or not understood."""
        if PREPROCESSING_KEY not in props:
            raise BadInputError(f"{what} carries no preprocessing ({PREPROCESSING_KEY} in its ONNX metadata_props): "
                                "use a model published by force-compress, or re-export it")
        try:
            d = json.loads(props[PREPROCESSING_KEY])
            labels = json.loads(props.get(LABELS_KEY, "[]"))
            if int(d.get("format", 0)) > FORMAT:
                raise ValueError(f"format {d['format']} is newer than this force-compress reads ({FORMAT})")
            resize = d["resize"]["library"]
            prep = cls(tuple(int(v) for v in d["input_size"]), tuple(float(v) for v in d["mean"]),
                       tuple(float(v) for v in d["std"]), tuple(str(v) for v in labels), resize,
                       scale=str(d.get("scale", "")), source=str(d.get("source", "")),
                       normalization=str(d.get("normalization_from", NORMALIZATION_FROM_DATA)))
            if resize not in _RESIZE or len(prep.input_size) != 3 or not (
                    len(prep.mean) == len(prep.std) == prep.input_size[0]) or min(prep.std) <= 0:
                raise ValueError(f"resize {resize!r}, input size {prep.input_size}, {len(prep.mean)} means, "
                                 f"{len(prep.std)} stds")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise BadInputError(f"{what}: unreadable {PREPROCESSING_KEY} metadata ({type(e).__name__}: {e})") from None
        return prep


def describe_splits(splits: DataSplits) -> Preprocessing:
    return Preprocessing(splits.input_shape, splits.mean, splits.std, splits.class_names, splits.resize, splits.scale,
                         splits.source, splits.normalization)


def normalization(mean, std, props: Mapping[str, str], channels: int,
                  what: str = "the input model") -> tuple[tuple | None, tuple | None, str]:
    """(mean, std, where they came from) for a model whose input has `channels` channels, in this order: the options
    (`mean`/`std`), the model file's own preprocessing record (`props`: its metadata_props), else (None, None): the
    training split's, computed by pipeline.data. A record that does not fit the model is BadInputError (exit 2)."""
    if mean is not None:
        if len(mean) != channels or len(std) != channels:
            raise BadInputError(f"--mean/--std have {len(mean)}/{len(std)} values but {what}'s input has {channels} "
                                "channel(s): give one value per channel")
        return tuple(float(v) for v in mean), tuple(float(v) for v in std), NORMALIZATION_FROM_OPTIONS
    if PREPROCESSING_KEY in props:
        prep = Preprocessing.from_metadata(props, what)
        if prep.input_size[0] != channels:
            raise BadInputError(f"{what}'s {PREPROCESSING_KEY} metadata describes {prep.input_size[0]} channel(s) but "
                                f"its input has {channels}: give --mean and --std")
        return prep.mean, prep.std, NORMALIZATION_FROM_MODEL
    return None, None, NORMALIZATION_FROM_DATA


# --- applying it to a file --------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, prep: Preprocessing) -> np.ndarray:
    """An image file (PNG, JPEG, … via Pillow, or a .npy array (H,W), (C,H,W), (H,W,C) or (1,C,H,W)) as the
    model's input (C, H, W) float32: the recorded resize, scaling, channels and normalisation, as in training."""
    import torch

    from pipeline.data import fit_images, read_image

    path = Path(path)
    c, h, w = prep.input_size
    if not path.is_file():
        raise BadInputError(f"image not found: {path}")
    try:
        if path.suffix.lower() == ".npy":
            x = _npy_image(path, prep)
        elif prep.resize == "pillow":
            x = _scaled(read_image(path, "L" if c == 1 else "RGB", (h, w)))
        else:
            x = _file_image(path)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(0)
        x = fit_images(x, (c, h, w), str(path))
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL and numpy raise many types for a broken file
        raise BadInputError(f"{path}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                            ) from None
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std)[0].numpy()


def _scaled(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) 8-bit → (C, H, W) float32 in [0, 1], as pipeline.data divides (float32 / 255)."""
    a = a.reshape(a.shape[0], a.shape[1], -1).transpose(2, 0, 1)
    return a.astype(np.float32) / np.float32(255.0)


def _file_image(path: Path) -> np.ndarray:
    """An image file at its own size and channels (grey 1, colour 3), scaled to [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I;16"):
            return np.asarray(im, dtype=np.float32)[None] / np.float32(65535.0)
        if im.mode in ("I", "F"):
            return _as_stored(np.asarray(im)[None])
        return _scaled(np.asarray(im.convert("L" if im.mode in _GREY_MODES else "RGB"), dtype=np.uint8))


def _as_stored(a: np.ndarray) -> np.ndarray:
    """The npz source's rule: uint8 / 255, other numbers as stored, / 255 when above 1.5 (0..255 kept as float)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise DataError(f"array of dtype {a.dtype}; expected uint8, integer or float")
    t = a.astype(np.float32)
    return t / np.float32(255.0) if t.size and float(t.max()) > 1.5 else t


def _npy_image(path: Path, prep: Preprocessing) -> np.ndarray:
    from pipeline.data import _to_nchw, read_image

    a = np.load(path, allow_pickle=False)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3):
        raise DataError(f"{path}: array of shape {a.shape}; expected one image (H,W), (C,H,W) or (H,W,C)")
    a = _to_nchw(a[None], prep.input_size[0], str(path))[0]
    if prep.resize == "pillow" and a.dtype == np.uint8 and a.shape[0] in (1, 3):
        # 8-bit pixels take the imagefolder path itself (PIL convert and 8-bit resize), as a PNG of them would
        from PIL import Image

        c, h, w = prep.input_size
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        return _scaled(read_image(im, "L" if c == 1 else "RGB", (h, w)))
    return _as_stored(a)
