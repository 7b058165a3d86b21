"""Where the images come from: data specs (`digits`, `imagefolder:PATH`, `npz:PATH`), preprocessing derived
from the model's input (N, C, H, W), a seeded train/validation split, and batch helpers for masks and training.

Imports torch, numpy, scikit-learn and PIL only; never stages or flows. Nothing is downloaded at run time.

Datasets are kept in memory as tensors (images at the model's H×W, scaled to [0, 1]); normalisation and
augmentation (random crop with zero padding, optional horizontal flip) run on whole batches of tensors.
Augmentation defaults: on for training, flip on for `imagefolder`/`npz`, **off for `digits`** (a mirrored
2, 3, 5 or 7 is not the same digit); `flip=True/False` overrides the source's default.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import DataError
from pipeline.geometry import GEOMETRY_DEFAULT, Geometry

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MAX_UNREADABLE_FRACTION = 0.01  # above this share of unreadable image files, the folder is refused
DEFAULT_GEOMETRY = Geometry()
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses


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


SourceFn = Callable[[str, tuple[int, int, int], Geometry], RawData]
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


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if x.shape[-2:] == (h, w):
        return x
    down = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down).clamp_(0.0, 1.0)


def fit_images(x: torch.Tensor, shape: tuple[int, int, int], what: str = "data",
               geometry: Geometry = DEFAULT_GEOMETRY) -> torch.Tensor:
    """(N, c, h, w) in [0, 1] -> (N, C, H, W): the default geometry is a bilinear resize (antialiased when shrinking,
    clamped to [0, 1]), any other torchvision's resize and centre crop; then the channel mapping of `map_channels`.
    The "torch" resize of the digits and npz sources (and of predict)."""
    c, h, w = shape
    if geometry.is_default:
        return map_channels(_resize(x, h, w), c, what)
    x = TF.resize(x, list(geometry.resize or (h, w)), interpolation=InterpolationMode(geometry.interpolation),
                  antialias=geometry.interpolation != "nearest")
    if geometry.crop is not None:
        x = TF.center_crop(x, list(geometry.crop))
    return map_channels(x.clamp_(0.0, 1.0), c, what)


def read_image(source, mode: str, size: tuple[int, int], geometry: Geometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """An image file (or a PIL image) as (H, W) or (H, W, 3) uint8: PIL's convert(mode) ("L" or "RGB"), then the
    default geometry's 8-bit bilinear resize to size (H, W), or any other's torchvision resize and centre crop of
    the PIL image (as torchvision's ImageNet transforms do). The "pillow" resize of the imagefolder source (and of
    predict); PIL's errors pass."""
    from PIL import Image

    h, w = size
    if not isinstance(source, Image.Image):
        with Image.open(source) as im:
            return read_image(im, mode, size, geometry)
    im = source.convert(mode)
    if geometry.is_default:
        return np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    im = TF.resize(im, list(geometry.resize or (h, w)), interpolation=InterpolationMode(geometry.interpolation))
    if geometry.crop is not None:
        im = TF.center_crop(im, list(geometry.crop))
    return np.asarray(im, dtype=np.uint8)


def _fitted(geometry: Geometry, h: int, w: int) -> str:
    return f"resized to {h}x{w}" if geometry.is_default else geometry.describe()


def map_channels(x: torch.Tensor, channels: int, what: str = "data") -> torch.Tensor:
    """(N, c, H, W) -> (N, channels, H, W): grey→RGB repeats, RGB→grey uses BT.601 luma, RGBA drops alpha."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 4:  # RGBA: drop alpha, then map RGB
        return map_channels(x[:, :3], channels, what)
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DataError(f"{what} has {c} channels but the model expects {channels}; only 1↔3 (and RGBA→3/1) are mapped")


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
    """A NumPy .npz with arrays `x` (uint8 0..255 or float, NCHW or NHWC or NHW) and `y` (integer labels);
    optional `x_val`/`y_val` for a fixed validation split and `class_names`."""
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

    def images(a: np.ndarray) -> torch.Tensor:
        a = _to_nchw(a, c, str(path))
        if a.dtype == np.uint8:
            t = torch.from_numpy(a.astype(np.float32) / 255.0)
        elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
            t = torch.from_numpy(a.astype(np.float32))
            if float(t.max()) > 1.5:  # integer-valued 0..255 stored as float or int
                t = t / 255.0
        else:
            raise DataError(f"{path}: x has dtype {a.dtype}; expected uint8 or float")
        return fit_images(t, (c, h, w), str(path), geometry).contiguous()

    def labels(a: np.ndarray, n: int, name: str) -> torch.Tensor:
        a = np.asarray(a).reshape(-1)
        if a.shape[0] != n or not (np.issubdtype(a.dtype, np.integer) or np.all(np.mod(a, 1) == 0)):
            raise DataError(f"{path}: {name} must hold {n} integer labels (got shape {a.shape}, dtype {a.dtype})")
        return torch.from_numpy(a.astype(np.int64))

    x = images(arrays["x"])
    y = labels(arrays["y"], x.shape[0], "y")
    x_val = y_val = None
    if "x_val" in arrays:
        x_val = images(arrays["x_val"])
        y_val = labels(arrays.get("y_val", np.zeros(0)), x_val.shape[0], "y_val")
    n_cls = int(max(int(y.max()) if len(y) else -1, int(y_val.max()) if y_val is not None and len(y_val) else -1)) + 1
    names = tuple(str(s) for s in arrays["class_names"]) if "class_names" in arrays else tuple(map(str, range(n_cls)))
    return RawData(x, y, names, x_val, y_val, description=f"npz {path} ({len(y)} images, {_fitted(geometry, h, w)})",
                   scale="uint8 / 255; other types as stored, / 255 when above 1.5")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_folder(root: Path, classes: list[str], shape: tuple[int, int, int],
                 geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    if c not in (1, 3):
        raise DataError(f"image folder {root}: the model expects {c} channels; images map only to 1 or 3")
    xs, ys, bad, total = [], [], [], 0
    index = {name: i for i, name in enumerate(classes)}
    for d in _class_dirs(root):
        if d.name not in index:
            raise DataError(f"image folder {root}: class folder {d.name!r} is not among the training classes")
        for f in sorted(d.rglob("*")):
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            total += 1
            try:
                a = read_image(f, mode, (h, w), geometry)
            except Exception:  # noqa: BLE001 - PIL raises many types for broken files
                bad.append(f)
                continue
            xs.append(a.reshape(h, w, -1))
            ys.append(index[d.name])
    if total == 0:
        exts = ", ".join(IMAGE_EXTENSIONS[:4])
        raise DataError(f"image folder {root} holds no images ({exts}, ...) in its class folders")
    if bad:
        names = ", ".join(str(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        if len(bad) > MAX_UNREADABLE_FRACTION * total:
            raise DataError(
                f"{len(bad)} of {total} images in {root} are unreadable (limit {MAX_UNREADABLE_FRACTION:.0%}): {names}"
            )
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {root}: {names}", stacklevel=3)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return x, torch.tensor(ys, dtype=torch.int64)


@register_source("imagefolder")
def _imagefolder(arg: str, shape: tuple[int, int, int], geometry: Geometry) -> RawData:
    """One sub-folder per class (names sorted give the label order), or `train/` and `val/` each laid out so."""
    if not arg:
        raise DataError("imagefolder spec needs a path: imagefolder:PATH")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    train_dir, val_dir = root / "train", root / "val"
    split = train_dir.is_dir() and val_dir.is_dir()
    base = train_dir if split else root
    classes = [d.name for d in _class_dirs(base)]
    if not classes:
        raise DataError(f"image folder {base} has no class sub-folders (expected {base}/<class>/<image>)")
    x, y = _load_folder(base, classes, shape, geometry)
    x_val = y_val = None
    if split:
        x_val, y_val = _load_folder(val_dir, classes, shape, geometry)
    return RawData(
        x, y, tuple(classes), x_val, y_val,
        description=f"imagefolder {root} ({len(classes)} classes, {len(y)} train images"
        + (f", {len(y_val)} val images" if y_val is not None else "") + f", {_fitted(geometry, shape[1], shape[2])})",
        resize="pillow",
    )


# -------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Augment:
    """Light training augmentation: random crop of the zero-padded image (padding `pad` pixels) and a random
    horizontal flip."""

    pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch (B, C, H, W) in one go: every image gets its own crop offset and flip."""
    if not aug.active or x.shape[0] == 0:
        return x
    b, _, h, w = x.shape
    if aug.pad > 0:
        p = aug.pad
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        x = xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> NCHW
    if aug.flip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


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

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment_batch(self.x[idx], self.augment, generator)
        return (x - self.mean) / self.std, self.y[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([int(i)]))
        return x[0], y[0]

    def with_augment(self, augment: Augment | None) -> TensorImageDataset:
        return TensorImageDataset(self.x, self.y, self.mean.flatten().tolist(), self.std.flatten().tolist(), augment)


@dataclass(frozen=True)
class DataSplits:
    """The data for one model: `train` (augmented if asked), `train_plain` (same images, no augmentation; for
    mask batches and train-set scoring), `val` (held out: never trained on; what validation scores)."""

    train: TensorImageDataset
    train_plain: TensorImageDataset
    val: TensorImageDataset
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


def _check_labels(y: torch.Tensor, num_classes: int, what: str) -> None:
    if len(y) == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        raise DataError(
            f"{what} has label {bad} but the model has {num_classes} outputs (labels must be 0..{num_classes - 1})"
        )


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
) -> DataSplits:
    """Load `spec` for a model whose input is (N, *input_shape) with `num_classes` outputs.

    mean/std per channel come from the training split unless given; `geometry` resizes and crops the images to the
    model's H×W (pipeline.preprocessing.resolve checked that it produces that size). `flip` None takes the source's
    default (off for digits); `pad` None is max(1, round(H/8)) pixels of crop padding. Raises DataError."""
    try:
        c, h, w = (int(v) if v is not None else -1 for v in input_shape)
    except (TypeError, ValueError):
        raise DataError(f"input shape must be (C, H, W) integers, got {input_shape!r}") from None
    if min(c, h, w) <= 0:
        raise DataError(f"model input (C, H, W) = {tuple(input_shape)} is not concrete; set image_size (H W)")
    if num_classes < 1:
        raise DataError(f"the model must have at least one output class (got {num_classes})")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    scheme, arg = parse_spec(spec)
    raw = _SOURCES[scheme](arg, (c, h, w), geometry)
    if raw.x.shape[1:] != (c, h, w):
        raise DataError(f"source {scheme} produced images of shape {tuple(raw.x.shape[1:])}, expected {(c, h, w)}")
    if len(raw.y) == 0:
        raise DataError(f"data spec {spec!r} holds no images")
    _check_labels(raw.y, num_classes, f"data {spec!r}")
    if raw.y_val is not None:
        _check_labels(raw.y_val, num_classes, f"validation data of {spec!r}")
        x_tr, y_tr, x_va, y_va = raw.x, raw.y, raw.x_val, raw.y_val
    else:
        tr, va = split_indices(raw.y, val_fraction, seed)
        x_tr, y_tr, x_va, y_va = raw.x[tr], raw.y[tr], raw.x[va], raw.y[va]
    if len(y_tr) == 0 or len(y_va) == 0:
        raise DataError(f"data {spec!r}: {len(y_tr)} train / {len(y_va)} validation images; need both non-empty")
    if mean is None:
        mean = tuple(float(v) for v in x_tr.mean(dim=(0, 2, 3)))
    if std is None:
        std = tuple(max(float(v), 1e-6) for v in x_tr.std(dim=(0, 2, 3)))
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != c or len(std) != c:
        raise DataError(f"mean/std have {len(mean)}/{len(std)} values but the model has {c} channels")
    aug = augmentation((c, h, w), raw.default_flip, augment, flip, pad)
    train_plain = TensorImageDataset(x_tr, y_tr, mean, std)
    return DataSplits(
        train=train_plain.with_augment(aug),
        train_plain=train_plain,
        val=TensorImageDataset(x_va, y_va, mean, std),
        num_classes=int(num_classes),
        class_names=tuple(raw.class_names),
        mean=mean,
        std=std,
        input_shape=(c, h, w),
        source=raw.description or spec,
        augment=aug,
        resize=raw.resize,
        scale=raw.scale,
        default_flip=raw.default_flip,
        geometry=geometry,
    )


# --------------------------------------------------------------------------------------------- batches


def mask_batches(splits: DataSplits, batch_size: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` mini-batches for computing masks, each a fresh seeded random draw (without replacement within a pass
    over the data) from the un-augmented training split."""
    ds = splits.train_plain
    g = torch.Generator().manual_seed(int(seed))
    bs = min(int(batch_size), len(ds))
    out, perm, pos = [], torch.randperm(len(ds), generator=g), 0
    for _ in range(int(n)):
        if pos + bs > len(perm):
            perm, pos = torch.randperm(len(ds), generator=g), 0
        out.append(ds.batch(perm[pos : pos + bs]))
        pos += bs
    return out


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
                world_size: int = 1, drop_last: bool = False, num_workers: int = 0):
    """A loader with `set_epoch`: the in-memory fast path for TensorImageDataset, torch's DataLoader with a
    DistributedSampler for any other Dataset."""
    if isinstance(dataset, TensorImageDataset):
        return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           drop_last=drop_last)
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=num_workers or min(4, os.cpu_count() or 1) - 1)
    loader.set_epoch = sampler.set_epoch  # type: ignore[attr-defined]
    return loader
