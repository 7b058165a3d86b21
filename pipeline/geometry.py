"""Where an image's pixels go before the model sees them: the resize and centre crop of a preprocessing record
(pipeline.preprocessing), as data. Applying it is pipeline.data's. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import BadInputError

__all__ = ["GEOMETRY_DEFAULT", "INTERPOLATIONS", "Geometry", "parse_size"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
GEOMETRY_DEFAULT = "default (straight resize to the model's input)"  # where a default geometry "came from"


def parse_size(text: str, what: str) -> tuple[int, ...]:
    """'256' → (256,), '224x192' → (224, 192) (H×W); BadInputError (exit 2) otherwise."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise BadInputError(f"{what} {text!r} is not a size: give N or HxW with positive integers (e.g. 256 or "
                            "224x224)")
    return size


@dataclass(frozen=True)
class Geometry:
    """How an image's pixels reach the model's H×W: `resize` None (straight to H×W, the default), (S,) (shorter
    side to S, aspect kept, as torchvision's Resize(S)) or (H, W); then a centre `crop` (H, W) or none; one
    `interpolation` (antialiased when shrinking, as torchvision)."""

    resize: tuple[int, ...] | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"

    @property
    def is_default(self) -> bool:
        return self.resize is None and self.crop is None and self.interpolation == "bilinear"

    def output_size(self) -> tuple[int, int] | None:
        """The H×W it produces, None for the default (the model's own)."""
        if self.crop is not None:
            return self.crop
        return self.resize if self.resize is not None and len(self.resize) == 2 else None

    def check(self, what: str = "the preprocessing") -> None:
        """A crop larger than the resize, or a shorter-side resize without a crop: BadInputError (exit 2)."""
        if self.interpolation not in INTERPOLATIONS:
            raise BadInputError(f"{what}: unknown interpolation {self.interpolation!r}; choose "
                                f"{', '.join(INTERPOLATIONS)}")
        if self.crop is not None and self.resize is not None:
            bound = (self.resize[0], self.resize[0]) if len(self.resize) == 1 else self.resize
            if self.crop[0] > bound[0] or self.crop[1] > bound[1]:
                raise BadInputError(f"{what}: the crop {_size(self.crop)} is larger than the resize "
                                    f"{_size(self.resize)}: give a crop no larger than the resized image")
        if self.resize is not None and len(self.resize) == 1 and self.crop is None:
            raise BadInputError(f"{what}: resizing the shorter side to {self.resize[0]} keeps each image's aspect, "
                                "so images differ in size: give --crop H[xW] as well")

    def check_model(self, hw: tuple[int, int], what: str) -> None:
        """The size it produces must be the model's input H×W (exit 2 before any work)."""
        out = self.output_size()
        if out is not None and tuple(out) != tuple(hw):
            raise BadInputError(f"the preprocessing produces {_size(out)} images but {what}'s input is "
                                f"{_size(hw)}: give a --crop (or --resize HxW) of {_size(hw)}, or --image-size for "
                                "a model with a dynamic size")

    def describe(self) -> str:
        if self.resize is None and self.crop is None:
            return f"straight {self.interpolation} resize to the model's input"
        resize = ("" if self.resize is None else
                  f"shorter side to {self.resize[0]}" if len(self.resize) == 1 else f"resize to {_size(self.resize)}")
        crop = "" if self.crop is None else f"centre crop {_size(self.crop)}"
        return f"{', '.join(p for p in (resize, crop) if p)} ({self.interpolation})"

    def to_dict(self) -> dict:
        return {"resize": None if self.resize is None else list(self.resize),
                "crop": None if self.crop is None else list(self.crop), "interpolation": self.interpolation,
                "antialias": True, "crop_rule": "centre: top = round((H - crop_h) / 2), left likewise (torchvision)",
                "resize_rule": "one size: shorter side to it, the longer int(size * long / short) (torchvision)"}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> Geometry:
        if not d:
            return cls()
        resize, crop = d.get("resize"), d.get("crop")
        return cls(None if resize is None else tuple(int(v) for v in resize),
                   None if crop is None else tuple(int(v) for v in crop), str(d.get("interpolation", "bilinear")))


def _size(size) -> str:
    return "x".join(str(v) for v in size)
