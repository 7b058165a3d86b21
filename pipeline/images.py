"""Pixels: decoding an image file to 8-bit at the model's size (`read_image`), fitting tensors to it
(`fit_images`, `map_channels`) and the training augmentation of whole batches (`Augment`, `augment_batch`).
Used by the data sources in memory and by the DataLoader workers of the streamed ones alike. Imports torch, numpy,
torchvision and PIL only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import DataError
from pipeline.geometry import Geometry

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
DEFAULT_GEOMETRY = Geometry()
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses


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
    """An image file (or a PIL image) as (H, W) or (H, W, 3) uint8: converted to `mode` ("L" or "RGB") as
    `to_8bit` says, then the default geometry's 8-bit bilinear resize to size (H, W), or any other's torchvision
    resize and centre crop of the PIL image (as torchvision's ImageNet transforms do). The "pillow" resize of the
    imagefolder source (and of predict). A file over PIL.Image.MAX_IMAGE_PIXELS is not decoded: its
    DecompressionBombWarning is raised, as PIL's errors are."""
    from PIL import Image

    h, w = size
    if not isinstance(source, Image.Image):
        with warnings.catch_warnings():  # PIL only warns below twice the limit, and would decode the bomb
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                return read_image(im, mode, size, geometry)
    im = to_8bit(source, mode)
    if geometry.is_default:
        return np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    im = TF.resize(im, list(geometry.resize or (h, w)), interpolation=InterpolationMode(geometry.interpolation))
    if geometry.crop is not None:
        im = TF.center_crop(im, list(geometry.crop))
    return np.asarray(im, dtype=np.uint8)


def to_8bit(im, mode: str):
    """A PIL image of any mode as an 8-bit `mode` ("L" or "RGB") image. PIL's own convert does this for 1, L, P, RGB,
    CMYK, YCbCr and the modes with alpha (alpha is dropped: the colour under it stays, nothing is composited). It
    saturates deeper images, so those are scaled here: 16-bit integers (I;16, I;16B, ...) by their range,
    value/65535; 32-bit integers (I) the same when they fit 0..65535, else by the image's largest value; floats (F)
    are fractions when they all lie in [0, 1], else 0..255. Negative values become 0, values above the range 255;
    an image holding NaN or infinity raises ValueError."""
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{int(np.count_nonzero(~np.isfinite(a)))} pixel value(s) are NaN or infinite")
        top = float(a.max(initial=0.0))
        if im.mode == "F":
            full = 1.0 if top <= 1.0 and float(a.min(initial=0.0)) >= 0.0 else 255.0
        else:
            full = 65535.0 if im.mode.startswith("I;16") or top <= 65535.0 else top
        grey = Image.fromarray(np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8))
        return grey if mode == "L" else grey.convert(mode)
    if im.mode in ("P", "PA") and "transparency" in im.info:  # PIL warns converting these unless via RGBA
        im = im.convert("RGBA")
    return im.convert(mode)


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
