"""Where the images come from: data specs (`digits`, `npz:PATH`, `imagefolder:PATH`, `webdataset:SHARDS`),
preprocessing derived from the model's input (N, C, H, W), a seeded train/validation split, and batch helpers for
masks and training.

Imports torch, numpy, scikit-learn and PIL only; never stages or flows. Nothing is downloaded at run time.

`digits` and `npz:` are read whole and kept in memory as tensors (images at the model's H×W, scaled to [0, 1]).
Image folders and shards are lists of files: a set whose decoded images fit in `memory_mb` is decoded once into
memory, a larger one is read from disk batch by batch in DataLoader workers (pipeline.files), so memory does not
grow with the number of images. Augmentation (random crop with zero padding, optional horizontal flip) defaults to
on for training, flip on for `imagefolder`/`npz`/`webdataset`, **off for `digits`** (a mirrored 2, 3, 5 or 7 is
not the same digit); `flip=True/False` overrides the source's default.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.artifacts import write_json_atomic
from pipeline.errors import DataError
from pipeline.files import (
    MAX_BAD_FRACTION,
    BadImages,
    FileImageDataset,
    FileList,
    FileLoader,
    class_dirs,
    default_workers,
    expand_shards,
    list_folder,
    list_shards,
)
from pipeline.geometry import GEOMETRY_DEFAULT, Geometry
from pipeline.images import DEFAULT_GEOMETRY, Augment, augment_batch, fit_images, map_channels, read_image

MEMORY_MB = 512.0  # default: a file source whose decoded images fit in this many MB is held in memory
MOMENT_IMAGES = 1000  # mean/std of a streamed source are measured on this many seeded training images

__all__ = ["MEMORY_MB", "DataSplits", "FileData", "RawData", "TensorImageDataset", "augment_batch", "augmented",
           "data_record", "fit_images", "load_data", "make_loader", "map_channels", "mask_batches", "read_image",
           "register_source"]


# --------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class RawData:
    """What a source hands back: images (N, C, H, W) float32 in [0, 1] already at the model's H×W and C,
    integer labels, and optionally its own validation split."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: tuple[str, ...]
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    description: str = ""
    default_flip: bool = True
    # How the source reached [0, 1] at H×W (pipeline.preprocessing records it with the exported model): `resize`
    # "torch" (fit_images: float resize, then channel mapping) or "pillow" (read_image: 8-bit convert and resize);
    # `scale`: how its stored values became [0, 1].
    resize: str = "torch"
    scale: str = "8-bit / 255"


SourceFn = Callable[[str, tuple[int, int, int], Geometry], "RawData | FileData"]
_SOURCES: dict[str, SourceFn] = {}


def register_source(scheme: str) -> Callable[[SourceFn], SourceFn]:
    """Register a data source for specs `scheme` or `scheme:ARG`. The function gets (ARG, (C, H, W), Geometry) and
    returns RawData at that shape, its images resized and cropped as the Geometry says (`fit_images`,
    `read_image`); it raises DataError with one line on bad input. Schemes are unique: registering one again raises
    ValueError naming it (registering the very same function again changes nothing)."""

    def deco(fn: SourceFn) -> SourceFn:
        old = _SOURCES.get(scheme)
        if old is not None and old is not fn:
            by = f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', repr(old))}"
            raise ValueError(f"a data source for scheme {scheme!r} is already registered (by {by}); choose another")
        _SOURCES[scheme] = fn
        return fn

    return deco


def available_sources() -> list[str]:
    return sorted(_SOURCES)


def parse_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; use one of: {', '.join(_spec_forms())}")
    scheme, _, arg = spec.strip().partition(":")
    if scheme not in _SOURCES:
        raise DataError(f"unknown data spec {spec!r}; use one of: {', '.join(_spec_forms())}")
    return scheme, arg


def _spec_forms() -> list[str]:
    return [s if s == "digits" else f"{s}:PATH" for s in available_sources()]


def _fitted(geometry: Geometry, h: int, w: int) -> str:
    return f"resized to {h}x{w}" if geometry.is_default else geometry.describe()


@register_source("digits")
def _digits(arg: str, shape: tuple[int, int, int], geometry: Geometry) -> RawData:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, grey levels 0..16, 10 classes)."""
    if arg:
        raise DataError(f"the digits spec takes no argument (got 'digits:{arg}')")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    c, h, w = shape
    x = fit_images(x, shape, "digits", geometry)
    return RawData(
        x=x.contiguous(),
        y=torch.from_numpy(d.target.astype(np.int64)),
        class_names=tuple(str(i) for i in range(10)),
        description=f"digits (scikit-learn, 1797 images 8x8 grey, {_fitted(geometry, h, w)}, {c} channel(s))",
        default_flip=False,
        scale="grey levels 0..16 / 16",
    )


def _to_nchw(a: np.ndarray, channels: int, path: str) -> np.ndarray:
    """Guess the layout of an image array: (N,H,W) grey, (N,C,H,W) or (N,H,W,C) with C in 1, 3, 4."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DataError(f"{path}: x has shape {a.shape}; expected (N,H,W), (N,C,H,W) or (N,H,W,C)")
    chw, hwc = a.shape[1] in (1, 3, 4), a.shape[3] in (1, 3, 4)
    if chw and hwc:  # e.g. (N,3,32,3): prefer the reading whose channel count equals the model's
        chw = a.shape[1] == channels or a.shape[3] != channels
        hwc = not chw
    if not chw and not hwc and min(a.shape[1], a.shape[3]) <= 4:  # e.g. 2 channels: say so when mapping them
        chw = a.shape[1] <= a.shape[3]
        hwc = not chw
    if chw:
        return a
    if hwc:
        return np.transpose(a, (0, 3, 1, 2))
    raise DataError(f"{path}: cannot tell the channel axis of x with shape {a.shape}; use 1, 3 or 4 channels")


@register_source("npz")
def _npz(arg: str, shape: tuple[int, int, int], geometry: Geometry) -> RawData:
    """A NumPy .npz with arrays `x` (NCHW or NHWC or NHW) and `y` (integer labels, or floats that are whole
    numbers); optional `x_val`/`y_val` for a fixed validation split and `class_names`. Pixels are uint8 0..255, or
    another integer or float type holding 0..255 (scaled by 1/255 when any value is above 1.5) or [0, 1] (taken as
    is); NaN, infinity and values outside those ranges (normalised images, 16-bit ones) are refused."""
    if not arg:
        raise DataError("npz spec needs a path: npz:PATH")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user problem
        raise DataError(f"cannot read npz file {path}: {e}") from None
    for k in ("x", "y"):
        if k not in arrays:
            raise DataError(f"{path}: missing array {k!r} (found {', '.join(sorted(arrays)) or 'none'})")
    c, h, w = shape

    def images(a: np.ndarray, name: str) -> torch.Tensor:
        if a.dtype.kind not in "uif":
            raise DataError(f"{path}: {name} has dtype {a.dtype}; expected uint8 or float")
        if len(a) == 0:
            raise DataError(f"{path}: {name} holds no images")
        _check_finite(a, f"{path}: {name}")
        a = _to_nchw(a, c, str(path))
        t = torch.from_numpy(a.astype(np.float32))
        if a.dtype == np.uint8 or float(t.max()) > 1.5:  # 0..255, stored as uint8, another integer type or float
            t = t / 255.0
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:  # normalised or deeper than 8 bits: no scaling could be guessed right
            raise DataError(f"{path}: {name} holds values from {float(a.min()):g} to {float(a.max()):g}; store images "
                            "unnormalised, as 0..255 or as floats in [0, 1]")
        return fit_images(t, (c, h, w), str(path), geometry).contiguous()

    def labels(a: np.ndarray, n: int, name: str) -> torch.Tensor:
        flat = a.reshape(-1)
        if a.dtype.kind not in "uif":
            held = "booleans" if a.dtype.kind == "b" else f"values of dtype {a.dtype}"
            raise DataError(f"{path}: {name} holds {held}; store integer class indices 0..K-1 (their names go in "
                            "class_names)")
        if flat.shape[0] != n:
            raise DataError(f"{path}: {name} has shape {a.shape}; expected one integer label for each of the {n} "
                            "images")
        if a.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                odd = ~np.isfinite(flat) | (np.mod(flat, 1) != 0)
            if odd.any():
                i = int(np.flatnonzero(odd)[0])
                raise DataError(f"{path}: {name} holds {int(odd.sum())} label(s) that are not whole numbers (first "
                                f"{flat[i]:g}, image {i}); labels are class indices 0..K-1")
        return torch.from_numpy(flat.astype(np.int64))

    x = images(arrays["x"], "x")
    y = labels(arrays["y"], x.shape[0], "y")
    x_val = y_val = None
    if "x_val" in arrays:
        x_val = images(arrays["x_val"], "x_val")
        y_val = labels(arrays.get("y_val", np.zeros(0)), x_val.shape[0], "y_val")
    n_cls = int(max(int(y.max()), int(y_val.max()) if y_val is not None else -1)) + 1
    names = tuple(str(s) for s in arrays["class_names"]) if "class_names" in arrays else tuple(map(str, range(n_cls)))
    if len(names) < n_cls:
        raise DataError(f"{path}: class_names has {len(names)} names but the labels go up to {n_cls - 1}; name every "
                        "class")
    return RawData(x, y, names, x_val, y_val, description=f"npz {path} ({len(y)} images, {_fitted(geometry, h, w)})",
                   scale="uint8 / 255; other types as stored, / 255 when above 1.5")


@dataclass(frozen=True)
class FileData:
    """What a source of files hands back: where its images are and their labels (pixels stay on disk), and
    optionally its own validation split. load_data decides whether they are decoded into memory (a small set) or
    streamed (`memory_mb`)."""

    files: FileList
    class_names: tuple[str, ...]
    files_val: FileList | None = None
    description: str = ""
    root: str = ""  # what the names in `files` are relative to
    default_flip: bool = True
    resize: str = "pillow"
    scale: str = "8-bit / 255"


@register_source("imagefolder")
def _imagefolder(arg: str, shape: tuple[int, int, int], geometry: Geometry) -> FileData:
    """One sub-folder per class (names sorted give the label order), or `train/` and `val/` each laid out so. Lists
    the files; decoding happens as batches are read."""
    if not arg:
        raise DataError("imagefolder spec needs a path: imagefolder:PATH")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    _check_decodable(shape, f"image folder {root}")
    train_dir, val_dir = root / "train", root / "val"
    split = train_dir.is_dir() and val_dir.is_dir()
    base = train_dir if split else root
    classes = [d.name for d in class_dirs(base)]
    if not classes:
        raise DataError(f"image folder {base} has no class sub-folders (expected {base}/<class>/<image>)")
    files = list_folder(base, classes, root)
    files_val = list_folder(val_dir, classes, root) if split else None
    return FileData(files, tuple(classes), files_val, root=str(root.resolve()),
                    description=f"imagefolder {root} ({len(classes)} classes, {len(files)} train images"
                    + (f", {len(files_val)} val images" if files_val is not None else "")
                    + f", {_fitted(geometry, shape[1], shape[2])})")


@register_source("webdataset")
def _webdataset(arg: str, shape: tuple[int, int, int], geometry: Geometry) -> FileData:
    """WebDataset tar shards on a file system: a brace pattern (`shards/train-{0000..0099}.tar`), a directory of
    .tar files, or a directory with `train/` and `val/` ones. Each sample is KEY.jpg (or .png, ...) with its class
    in KEY.cls; members are read in place, never unpacked."""
    if not arg:
        raise DataError("webdataset spec needs shards: webdataset:PATH_OR_BRACE_PATTERN")
    _check_decodable(shape, f"webdataset:{arg}")
    root = Path(arg).expanduser()
    split = root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir()
    names_from = root if root.is_dir() else Path(arg.split("{")[0]).expanduser().parent
    files = list_shards(expand_shards(str(root / "train") if split else arg), names_from)
    files_val = list_shards(expand_shards(str(root / "val")), names_from) if split else None
    n_cls = int(max(files.labels.max(), -1 if files_val is None else files_val.labels.max())) + 1
    shards = len(set(files.paths.tolist()))
    return FileData(files, tuple(map(str, range(n_cls))), files_val, root=str(names_from.resolve()),
                    description=f"webdataset {arg} ({shards} shard(s), {len(files)} train samples"
                    + (f", {len(files_val)} val samples" if files_val is not None else "")
                    + f", {_fitted(geometry, shape[1], shape[2])})")


def _check_decodable(shape: tuple[int, int, int], what: str) -> None:
    if shape[0] not in (1, 3):
        raise DataError(f"{what}: the model expects {shape[0]} channels; images map only to 1 or 3")


# -------------------------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """Images held in memory as (N, C, H, W) float32 in [0, 1]; normalised (and augmented) on the way out.

    `batch(idx, generator)` returns a whole normalised batch at once (the fast path used by training and masks);
    `__getitem__` serves torch's DataLoader for anything that wants single samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, augment: Augment | None = None):
        self.x, self.y = x, y
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment or Augment()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment_batch(self.x[idx], self.augment, generator)
        return (x - self.mean) / self.std, self.y[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def with_augment(self, augment: Augment | None) -> TensorImageDataset:
        return TensorImageDataset(self.x, self.y, self.mean.flatten().tolist(), self.std.flatten().tolist(), augment)

    def batches(self, index_batches: Sequence, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of the given indices, in order (as FileImageDataset.batches)."""
        for idx in index_batches:
            yield self.batch(torch.as_tensor(idx, dtype=torch.int64))

    @property
    def labels(self) -> torch.Tensor:
        return self.y


ImageSet = TensorImageDataset | FileImageDataset


@dataclass(frozen=True)
class DataSplits:
    """The data for one model: `train` (augmented if asked), `train_plain` (same images, no augmentation; for
    mask batches and train-set scoring), `val` (held out: never trained on; what validation scores). Each is held
    in memory (TensorImageDataset) or read from disk batch by batch (pipeline.files.FileImageDataset)."""

    train: ImageSet
    train_plain: ImageSet
    val: ImageSet
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    source: str
    augment: Augment = field(default_factory=Augment)
    resize: str = "torch"  # RawData.resize and .scale of the source
    scale: str = "8-bit / 255"
    default_flip: bool = True  # the source's: whether a horizontal flip keeps an image's class
    normalization: str = "the training split"  # where mean/std came from (pipeline.preprocessing.resolve)
    geometry: Geometry = DEFAULT_GEOMETRY  # the resize and crop the images took (pipeline.preprocessing.resolve)
    geometry_from: str = GEOMETRY_DEFAULT
    held: str = "in memory"  # "in memory" or "streamed from disk", and why
    bad: BadImages = field(default_factory=BadImages, compare=False)  # unreadable images met so far
    split_file: str | None = None  # the held-out split of a file source, as a list of files
    val_total: int = 0  # held-out images before --val-images capped them (0: not capped)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_plain, FileImageDataset)


def data_record(splits: DataSplits) -> dict:
    """What a report says of the data: where it came from, how it was held, the split file, the held-out images
    scored (and how many there were before --val-images), and the unreadable images met so far."""
    return {"source": splits.source, "held": splits.held, "split_file": splits.split_file,
            "train_images": len(splits.train_plain), "val_images": len(splits.val), "val_total": splits.val_total,
            "unreadable": splits.bad.summary()}


def augmentation(input_shape: tuple[int, int, int], default_flip: bool, augment: bool = True,
                 flip: bool | None = None, pad: int | None = None) -> Augment:
    """The training augmentation: `flip` None takes the source's default; `pad` None is max(1, round(H/8)) pixels of
    crop padding; none at all unless `augment`."""
    if not augment:
        return Augment(pad=0, flip=False)
    h = input_shape[1]
    return Augment(pad=max(1, round(h / 8)) if pad is None else int(pad),
                   flip=default_flip if flip is None else bool(flip))


def augmented(splits: DataSplits, augment: bool = True) -> DataSplits:
    """`splits` whose training set is augmented as `load_data(..., augment=augment)` would have made it: data opened
    once without augmentation serves masks, validation and training alike."""
    aug = augmentation(splits.input_shape, splits.default_flip, augment)
    return replace(splits, train=splits.train_plain.with_augment(aug), augment=aug)


def split_indices(y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, stratified split: per class, a seeded shuffle and round(val_fraction·n_class) to val
    (at least one per class with ≥ 2 images)."""
    rng = np.random.default_rng(seed)
    y_np = y.numpy()
    train, val = [], []
    for c in np.unique(y_np):
        idx = np.flatnonzero(y_np == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(val_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val.append(idx[:k])
        train.append(idx[k:])
    tr, va = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    return torch.from_numpy(tr), torch.from_numpy(va)


def _check_labels(ys: Sequence[torch.Tensor | None], class_names: Sequence[str], num_classes: int,
                  what: str) -> None:
    """The labels of all splits against the model: none negative, no more classes than outputs (the published
    metadata names one class per output), and at least two classes present."""
    held = [v for v in ys if v is not None and len(v)]
    if not held:
        return
    y = torch.cat(held)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DataError(f"{what} has negative label {lo}; labels must be class indices 0..{num_classes - 1}")
    names = [*class_names, *map(str, range(len(class_names), hi + 1))]
    if len(names) > num_classes:
        at = f": label {hi} but the model has" if hi >= num_classes else " but the model has"
        extra = names[num_classes:]
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise DataError(f"{what} has {len(names)} classes{at} {num_classes} outputs (labels must be "
                        f"0..{num_classes - 1}); use a model with {len(names)} outputs or leave out class(es) "
                        f"{', '.join(map(repr, extra[:3]))}{more}")
    if len(torch.unique(y)) < 2:
        raise DataError(f"{what} holds only one class ({names[lo]!r}) in its {len(y)} images: a classifier needs at "
                        "least two; add images of the other classes")


def _check_finite(a: np.ndarray, what: str) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a.sum(dtype=np.float64)):  # the sum: no mask unless needed
        bad = ~np.isfinite(a.reshape(len(a), -1))
        if bad.any():
            first = int(np.flatnonzero(bad.any(1))[0])
            raise DataError(f"{what} holds {int(bad.sum())} NaN or infinite value(s) (first in image {first}); "
                            "replace them or drop those images")


def _check_pixels(x: torch.Tensor | None, what: str) -> None:
    """Images held in memory are finite and in [0, 1], whatever source decoded them."""
    if x is None or x.numel() == 0:
        return
    _check_finite(x.numpy(), what)
    lo, hi = torch.aminmax(x)
    if float(lo) < -1e-4 or float(hi) > 1 + 1e-4:  # float rounding of a resize or a luma sum stays well inside
        raise DataError(f"{what} holds pixel values from {float(lo):.4g} to {float(hi):.4g} after decoding, outside "
                        "[0, 1]; a source must scale its images to [0, 1]")


def load_data(
    spec: str,
    input_shape: tuple[int, int, int],
    *,
    num_classes: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    flip: bool | None = None,
    pad: int | None = None,
    geometry: Geometry = DEFAULT_GEOMETRY,
    split_file: str | os.PathLike | None = None,
    val_images: int | None = None,
    memory_mb: float = MEMORY_MB,
    workers: int | None = None,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> DataSplits:
    """Load `spec` for a model whose input is (N, *input_shape) with `num_classes` outputs.

    mean/std per channel come from the training split unless given; `geometry` resizes and crops the images to the
    model's H×W (pipeline.preprocessing.resolve checked that it produces that size). `flip` None takes the source's
    default (off for digits); `pad` None is max(1, round(H/8)) pixels of crop padding.

    A source of files (imagefolder, webdataset) is held in memory when its decoded images fit in `memory_mb`, else
    read from disk batch by batch by `workers` DataLoader workers; its held-out split is a seeded list of files,
    read from `split_file` when that exists (written there otherwise). `val_images` caps the held-out images
    scored (a seeded, stratified choice). Raises DataError."""
    try:
        c, h, w = (int(v) if v is not None else -1 for v in input_shape)
    except (TypeError, ValueError):
        raise DataError(f"input shape must be (C, H, W) integers, got {input_shape!r}") from None
    if min(c, h, w) <= 0:
        raise DataError(f"model input (C, H, W) = {tuple(input_shape)} is not concrete; set "
                        "its height and width with --image-size H W")
    if num_classes < 1:
        raise DataError(f"the model must have at least one output class (got {num_classes})")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    scheme, arg = parse_spec(spec)
    raw = _SOURCES[scheme](arg, (c, h, w), geometry)
    if isinstance(raw, FileData):
        return _file_splits(raw, spec, (c, h, w), num_classes, val_fraction, seed, augment, mean, std, flip, pad,
                            geometry, split_file, val_images, memory_mb, workers, max_bad_fraction)
    if raw.x.shape[1:] != (c, h, w):
        raise DataError(f"source {scheme} produced images of shape {tuple(raw.x.shape[1:])}, expected {(c, h, w)}")
    if len(raw.y) == 0:
        raise DataError(f"data spec {spec!r} holds no images")
    _check_labels([raw.y, raw.y_val], raw.class_names, num_classes, f"data {spec!r}")
    _check_pixels(raw.x, f"data {spec!r}")
    _check_pixels(raw.x_val, f"validation data of {spec!r}")
    if raw.y_val is not None:
        x_tr, y_tr, x_va, y_va = raw.x, raw.y, raw.x_val, raw.y_val
    else:
        tr, va = split_indices(raw.y, val_fraction, seed)
        x_tr, y_tr, x_va, y_va = raw.x[tr], raw.y[tr], raw.x[va], raw.y[va]
    if len(y_tr) == 0 or len(y_va) == 0:
        raise DataError(f"data {spec!r}: {len(y_tr)} train / {len(y_va)} validation images; need both non-empty")
    val_total = len(y_va)
    if val_images is not None and val_images < len(y_va):
        keep = _capped(y_va, val_images, seed)
        x_va, y_va = x_va[keep], y_va[keep]
    mean, std = _moments(mean, std, c, lambda: [x_tr])
    aug = augmentation((c, h, w), raw.default_flip, augment, flip, pad)
    train_plain = TensorImageDataset(x_tr, y_tr, mean, std)
    mb = (raw.x.numel() + (0 if raw.x_val is None else raw.x_val.numel())) * 4 / 2**20
    return DataSplits(
        train=train_plain.with_augment(aug), train_plain=train_plain, val=TensorImageDataset(x_va, y_va, mean, std),
        num_classes=int(num_classes), class_names=tuple(raw.class_names), mean=mean, std=std, input_shape=(c, h, w),
        source=raw.description or spec, augment=aug, resize=raw.resize, scale=raw.scale,
        default_flip=raw.default_flip, geometry=geometry, held=f"in memory ({mb:.0f} MB decoded; {scheme} is read "
        "whole)", val_total=val_total if len(y_va) < val_total else 0,
    )


def _moments(mean, std, channels: int, batches: Callable[[], Iterable[torch.Tensor]]) -> tuple[tuple, tuple]:
    """mean/std as given, else per channel over the images of `batches()` ((N, C, H, W) each, summed batch by
    batch: a streamed sample is never held whole)."""
    if mean is None or std is None:
        total = torch.zeros(3, channels, dtype=torch.float64)  # count, sum, sum of squares per channel
        for x in batches():
            x = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
            total += torch.stack([torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64), x.sum(1),
                                  (x * x).sum(1)])
        n, s1, s2 = total
        m = s1 / n.clamp(min=1)
        var = ((s2 - n * m * m) / (n - 1).clamp(min=1)).clamp(min=0)  # unbiased, as torch.std
        mean = tuple(float(v) for v in m) if mean is None else mean
        std = tuple(max(float(v), 1e-6) for v in var.sqrt()) if std is None else std
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"mean/std have {len(mean)}/{len(std)} values but the model has {channels} channels")
    return mean, std


def _capped(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` of the indices of `y` (in order), a seeded stratified choice (as split_indices draws)."""
    _, keep = split_indices(y, min(max(n, 1) / len(y), 0.999999), seed + 1)
    if len(keep) > n:
        keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
    return keep


def _file_splits(raw: FileData, spec: str, shape, num_classes, val_fraction, seed, augment, mean, std, flip, pad,
                 geometry, split_file, val_images, memory_mb, workers, max_bad_fraction) -> DataSplits:
    c, h, w = shape
    _check_labels([torch.from_numpy(f.labels) for f in (raw.files, raw.files_val) if f is not None],
                  raw.class_names, num_classes, f"data {spec!r}")
    if raw.files_val is not None:
        train_files, val_files = raw.files, raw.files_val
    else:
        train_files, val_files = _split_files(raw.files, spec, val_fraction, seed, split_file)
    if len(train_files) == 0 or len(val_files) == 0:
        raise DataError(f"data {spec!r}: {len(train_files)} train / {len(val_files)} validation images; need both "
                        "non-empty")
    val_total = len(val_files)
    if val_images is not None and val_images < len(val_files):
        val_files = val_files.subset(_capped(torch.from_numpy(val_files.labels), val_images, seed).numpy())
    bad = BadImages(max_bad_fraction, total=len(train_files) + len(val_files))
    n_workers = default_workers() if workers is None else int(workers)
    plain = FileImageDataset(train_files, shape, geometry, (0.0,) * c, (1.0,) * c, seed=seed, bad=bad,
                             workers=n_workers)
    val = FileImageDataset(val_files, shape, geometry, (0.0,) * c, (1.0,) * c, seed=seed, bad=bad, workers=n_workers)
    decoded_mb = (len(train_files) + len(val_files)) * c * h * w * 4 / 2**20
    if decoded_mb <= memory_mb:  # a small set: decoded once (by the workers), then served from memory
        plain, val = _decoded(plain), _decoded(val)
        for d in (plain, val):
            _check_pixels(d.x, f"data {spec!r}")
        mean, std = _moments(mean, std, c, lambda: [plain.x])
        plain, val = (TensorImageDataset(d.x, d.y, mean, std) for d in (plain, val))
        held = f"in memory ({decoded_mb:.0f} MB decoded, within --memory-mb {memory_mb:g})"
    else:
        def sample():  # moments of a seeded sample of the training images, not of them all
            n = min(len(plain), MOMENT_IMAGES)
            pick = torch.randperm(len(plain), generator=torch.Generator().manual_seed(seed))[:n].sort().values
            return (x for x, _ in plain.batches(pick.split(64)))

        mean, std = _moments(mean, std, c, sample)
        plain, val = plain.normalised(mean, std), val.normalised(mean, std)
        held = (f"streamed from disk by {n_workers} worker(s) ({decoded_mb:.0f} MB decoded would exceed "
                f"--memory-mb {memory_mb:g})")
    aug = augmentation(shape, raw.default_flip, augment, flip, pad)
    return DataSplits(
        train=plain.with_augment(aug), train_plain=plain, val=val, num_classes=int(num_classes),
        class_names=tuple(raw.class_names), mean=mean, std=std, input_shape=(c, h, w), source=raw.description or spec,
        augment=aug, resize=raw.resize, scale=raw.scale, default_flip=raw.default_flip, geometry=geometry, held=held,
        bad=bad, split_file=None if split_file is None or raw.files_val is not None else str(split_file),
        val_total=val_total if len(val_files) < val_total else 0,
    )


def _decoded(ds: FileImageDataset) -> TensorImageDataset:
    """A file dataset decoded into memory as it is (read by its workers), its unreadable images left out (and
    counted)."""
    xs, ys = [], []
    for x, y in ds.batches(torch.arange(len(ds)).split(64)):
        xs.append(x)
        ys.append(y)
    x = torch.cat(xs) if xs else torch.zeros((0, *ds.shape))
    return TensorImageDataset(x, torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64), ds.mean.flatten().tolist(),
                              ds.std.flatten().tolist())


def _split_files(files: FileList, spec: str, val_fraction: float, seed: int,
                 split_file: str | os.PathLike | None) -> tuple[FileList, FileList]:
    """The seeded, stratified split of a file list: read from `split_file` when it exists (the names it lists must
    all be in the data), else drawn and written there."""
    path = None if split_file is None else Path(split_file)
    if path is not None and path.is_file():
        try:
            record = json.loads(path.read_text())
            val_names = record["val"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"split file {path} is unreadable ({e}); delete it to draw the split again") from None
        where = {name: i for i, name in enumerate(files.names.tolist())}
        missing = [n for n in val_names if n not in where]
        if missing:
            raise DataError(f"split file {path} names {len(missing)} held-out image(s) no longer in {spec} (first: "
                            f"{missing[0]}); delete it to draw the split again")
        is_val = np.zeros(len(files), dtype=bool)
        is_val[[where[n] for n in val_names]] = True
        return files.subset(np.flatnonzero(~is_val)), files.subset(np.flatnonzero(is_val))
    tr, va = split_indices(torch.from_numpy(files.labels), val_fraction, seed)
    train, val = files.subset(tr.numpy()), files.subset(va.numpy())
    if path is not None:
        write_json_atomic(path, {"format": 1, "data": spec, "seed": seed, "val_fraction": val_fraction,
                                 "train_images": len(train), "val": val.names.tolist()})
    return train, val


# --------------------------------------------------------------------------------------------- batches


def mask_batches(splits: DataSplits, batch_size: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` mini-batches for computing masks, each a fresh seeded random draw (without replacement within a pass
    over the data) from the un-augmented training split; a streamed split reads only these images."""
    ds = splits.train_plain
    g = torch.Generator().manual_seed(int(seed))
    bs = min(int(batch_size), len(ds))
    draws, perm, pos = [], torch.randperm(len(ds), generator=g), 0
    for _ in range(int(n)):
        if pos + bs > len(perm):
            perm, pos = torch.randperm(len(ds), generator=g), 0
        draws.append(perm[pos : pos + bs])
        pos += bs
    return list(ds.batches(draws))


class BatchLoader:
    """Batches of a TensorImageDataset in a seeded order: epoch `e` uses the permutation of DistributedSampler
    (seed, e), this rank's share, and augmentation drawn from a generator seeded by (seed, e, rank), so an epoch
    is the same whether or not the run was interrupted before it. `per_rank_batch` images per batch."""

    def __init__(
        self,
        dataset: TensorImageDataset,
        per_rank_batch: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        from torch.utils.data.distributed import DistributedSampler

        self.dataset, self.batch_size, self.seed, self.rank = dataset, int(per_rank_batch), int(seed), int(rank)
        self.drop_last = drop_last
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        for i in range(len(self)):
            yield self.dataset.batch(idx[i * self.batch_size : (i + 1) * self.batch_size], g)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                world_size: int = 1, drop_last: bool = False, num_workers: int | None = None,
                pin_memory: bool = False):
    """A loader with `set_epoch` over this rank's share: the in-memory fast path for TensorImageDataset, DataLoader
    workers reading from disk for a FileImageDataset (`pin_memory` for CUDA), torch's DataLoader with a
    DistributedSampler for any other Dataset."""
    if isinstance(dataset, TensorImageDataset):
        return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           drop_last=drop_last)
    if isinstance(dataset, FileImageDataset):
        return FileLoader(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                          drop_last=drop_last, workers=num_workers, pin_memory=pin_memory)
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=num_workers if num_workers is not None else min(4, os.cpu_count() or 1) - 1)
    loader.set_epoch = sampler.set_epoch  # type: ignore[attr-defined]
    return loader
