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
from pipeline.geometry import GEOMETRY_DEFAULT, Geometry, parse_size

if TYPE_CHECKING:  # pipeline.data (torch) loads only where images are: reading the record stays light (publish)
    from pipeline.data import DataSplits

__all__ = ["LABELS_KEY", "PREPROCESSING_KEY", "PRESETS", "Preprocessing", "Resolved", "describe_splits", "load_image",
           "resolve"]

PREPROCESSING_KEY = "force_compress.preprocessing"  # metadata_props keys; values are JSON
LABELS_KEY = "force_compress.labels"
FORMAT = 2  # the preprocessing record's version: a reader refuses a newer one (2 added `geometry`)
# Where a run's preprocessing came from, per part, first that applies: the options, a named preset, the input file's
# own record, else the data (mean/std: the training split's) or a straight resize to the model's input (geometry).
FROM_OPTIONS = "the options"
FROM_MODEL = "the input model's force_compress.preprocessing metadata"
NORMALIZATION_FROM_OPTIONS = "--mean/--std"
NORMALIZATION_FROM_MODEL = FROM_MODEL
NORMALIZATION_FROM_DATA = "the training split"

# Named presets: torchvision's ImageNet eval transform (ResNet50_Weights.IMAGENET1K_V1.transforms(), and most
# torchvision and timm ImageNet classifiers): shorter side to 256 bilinear, centre crop 224, ImageNet mean/std.
PRESETS: dict[str, dict] = {
    "imagenet": {"resize": "256", "crop": "224", "interpolation": "bilinear",
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}


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
    normalization: str = NORMALIZATION_FROM_DATA  # where mean/std came from (resolve)
    geometry: Geometry = Geometry()  # resize and crop before the model's H×W (resolve)
    geometry_from: str = GEOMETRY_DEFAULT

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
            "geometry": {**self.geometry.to_dict(), "from": self.geometry_from},
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
                       normalization=str(d.get("normalization_from", NORMALIZATION_FROM_DATA)),
                       geometry=Geometry.from_dict(d.get("geometry")),
                       geometry_from=str((d.get("geometry") or {}).get("from", GEOMETRY_DEFAULT)))
            if resize not in _RESIZE or len(prep.input_size) != 3 or not (
                    len(prep.mean) == len(prep.std) == prep.input_size[0]) or min(prep.std) <= 0:
                raise ValueError(f"resize {resize!r}, input size {prep.input_size}, {len(prep.mean)} means, "
                                 f"{len(prep.std)} stds")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise BadInputError(f"{what}: unreadable {PREPROCESSING_KEY} metadata ({type(e).__name__}: {e})") from None
        return prep


def describe_splits(splits: DataSplits) -> Preprocessing:
    return Preprocessing(splits.input_shape, splits.mean, splits.std, splits.class_names, splits.resize, splits.scale,
                         splits.source, splits.normalization, splits.geometry, splits.geometry_from)


@dataclass(frozen=True)
class Resolved:
    """A run's preprocessing before the data is opened: mean/std (None: the training split's) and the geometry,
    each with where it came from."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    normalization: str
    geometry: Geometry
    geometry_from: str


_GEOMETRY_PARTS = ("resize", "crop", "interpolation")


def resolve(options: Mapping, props: Mapping[str, str] | None = None, channels: int | None = None,
            hw: tuple[int, int] | None = None, what: str = "the input model") -> Resolved:
    """The preprocessing of a run, part by part from the first source that states it: the options (`options`:
    mean, std, resize, crop, interpolation, None where not given), the preset named by options['preprocessing'],
    the model file's own record (`props`: its metadata_props), else the defaults. With `channels` and `hw` (the
    model's input) it is checked against the model too. Anything contradictory is BadInputError (exit 2)."""
    preset_name = options.get("preprocessing")
    if preset_name is not None and preset_name not in PRESETS:
        raise BadInputError(f"unknown preprocessing preset {preset_name!r}; choose one of {', '.join(PRESETS)}, or "
                            "state it with --mean/--std/--resize/--crop/--interpolation")
    preset = PRESETS.get(preset_name, {})
    preset_from = f"preset {preset_name}"
    record = None
    if props is not None and PREPROCESSING_KEY in props:
        record = Preprocessing.from_metadata(props, what)
        if channels is not None and record.input_size[0] != channels:
            raise BadInputError(f"{what}'s {PREPROCESSING_KEY} metadata describes {record.input_size[0]} channel(s) "
                                f"but its input has {channels}: give --mean and --std")

    if options.get("mean") is not None:
        mean, std, norm_from = options["mean"], options["std"], NORMALIZATION_FROM_OPTIONS
    elif preset:
        mean, std, norm_from = preset["mean"], preset["std"], preset_from
    elif record is not None:
        mean, std, norm_from = record.mean, record.std, FROM_MODEL
    else:
        mean, std, norm_from = None, None, NORMALIZATION_FROM_DATA
    if mean is not None:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != len(std) or not mean:
            raise BadInputError(f"mean/std from {norm_from} have {len(mean)}/{len(std)} values: one per channel each")
        if min(std) <= 0:
            label = "--std" if norm_from == NORMALIZATION_FROM_OPTIONS else f"the std of {norm_from}"
            raise BadInputError(f"{label} must be positive, got {','.join(f'{v:g}' for v in std)}")
        if channels is not None and len(mean) != channels:
            raise BadInputError(f"mean/std from {norm_from} have {len(mean)} values but {what}'s input has "
                                f"{channels} channel(s): give --mean and --std with one value per channel")

    parts, sources = {}, []
    recorded = record.geometry.to_dict() if record is not None and not record.geometry.is_default else {}
    for part in _GEOMETRY_PARTS:
        for value, source in ((options.get(part), FROM_OPTIONS), (preset.get(part), preset_from),
                              (recorded.get(part), FROM_MODEL)):
            if value is not None:
                parts[part] = value
                sources.append(source)
                break
    geometry = Geometry(
        None if parts.get("resize") is None else _as_size(parts["resize"], "--resize"),
        None if parts.get("crop") is None else _square(_as_size(parts["crop"], "--crop")),
        str(parts.get("interpolation", "bilinear")))
    geometry_from = " and ".join(dict.fromkeys(sources)) or GEOMETRY_DEFAULT
    geometry.check(f"the preprocessing (from {geometry_from})")
    if hw is not None:
        geometry.check_model(hw, what)
    return Resolved(mean, std, norm_from, geometry, geometry_from)


def _as_size(value, what: str) -> tuple[int, ...]:
    return parse_size(value, what) if isinstance(value, str) else tuple(int(v) for v in value)


def _square(size: tuple[int, ...]) -> tuple[int, int]:
    return (size[0], size[0]) if len(size) == 1 else size


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
            x, fitted = _npy_image(path, prep)
        elif prep.resize == "pillow":
            x, fitted = _scaled(read_image(path, "L" if c == 1 else "RGB", (h, w), prep.geometry)), True
        else:
            x, fitted = _file_image(path), False
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(0)
        # an image the pillow path fitted is at H×W already: the default geometry then only maps its channels
        x = fit_images(x, (c, h, w), str(path), Geometry() if fitted else prep.geometry)
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


def _npy_image(path: Path, prep: Preprocessing) -> tuple[np.ndarray, bool]:
    """The array as (C, H, W) in [0, 1], and whether it is fitted to the model's H×W already."""
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
        return _scaled(read_image(im, "L" if c == 1 else "RGB", (h, w), prep.geometry)), True
    return _as_stored(a), False
