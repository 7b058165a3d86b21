"""ParamMap: every parameter and buffer of the converted module ↔ the ONNX initializer it came from,
with the transform applied on the way in (onnx2torch keeps no such link; it builds a Gemm with
transB=0 or alpha≠1 as an nn.Linear holding a transposed, scaled copy). Export undoes each transform."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class ParamEntry:
    """One state_dict entry. torch value = transpose?(onnx value) * scale."""

    name: str  # state_dict key
    initializer: str  # ONNX initializer name
    kind: str  # "parameter" or "buffer"
    onnx_shape: tuple[int, ...]
    transpose: bool = False
    scale: float = 1.0
    prunable: bool = False


@dataclass
class ParamMap:
    """Lookup both ways. Tied weights: several state_dict names, one initializer; `canonical` names the
    one `named_parameters()` reports, which is the one masks use."""

    entries: dict[str, ParamEntry] = field(default_factory=dict)
    canonical: dict[str, str] = field(default_factory=dict)  # initializer -> state_dict key
    unmapped: tuple[str, ...] = ()  # state_dict keys with no initializer (constants, counters)

    @property
    def prunable(self) -> list[str]:
        return [n for n in self.canonical.values() if self.entries[n].prunable]

    @property
    def prunable_initializers(self) -> list[str]:
        return [self.entries[n].initializer for n in self.prunable]

    def to_initializer(self, name: str) -> str:
        return self.entries[name].initializer

    def to_param(self, initializer: str) -> str:
        return self.canonical[initializer]

    # values ------------------------------------------------------------------------------------
    def tensor_to_onnx(self, name: str, value: torch.Tensor) -> np.ndarray:
        """Undo the import transform: divide the scale out, transpose back; shape checked."""
        e = self.entries[name]
        t = value.detach().cpu()
        if t.is_floating_point():  # integers (shapes, indices) pass through exactly
            t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        if e.scale != 1.0:
            t = t / e.scale
        if e.transpose:
            t = t.T
        if tuple(t.shape) != e.onnx_shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match initializer "
                             f"{e.initializer!r} {e.onnx_shape}")
        return t.contiguous().numpy()

    def tensor_from_onnx(self, name: str, value: np.ndarray) -> torch.Tensor:
        e = self.entries[name]
        t = torch.from_numpy(np.ascontiguousarray(value))
        if e.transpose:
            t = t.T
        if e.scale != 1.0:
            t = t * e.scale
        return t.contiguous()

    # masks -------------------------------------------------------------------------------------
    def mask_to_onnx(self, name: str, mask: torch.Tensor) -> np.ndarray:
        e = self.entries[name]
        m = mask.detach().to("cpu", torch.bool)
        if e.transpose:
            m = m.T
        if tuple(m.shape) != e.onnx_shape:
            raise ValueError(f"mask of {name}: shape {tuple(m.shape)} does not match initializer "
                             f"{e.initializer!r} {e.onnx_shape}")
        return m.contiguous().numpy()

    def mask_from_onnx(self, initializer: str, mask: np.ndarray) -> tuple[str, torch.Tensor]:
        name = self.canonical[initializer]
        e = self.entries[name]
        if tuple(mask.shape) != e.onnx_shape:
            raise ValueError(f"mask for {initializer!r}: shape {tuple(mask.shape)}, the initializer has {e.onnx_shape}")
        m = torch.from_numpy(np.ascontiguousarray(mask.astype(bool)))
        if e.transpose:
            m = m.T
        return name, m.contiguous()

    def masks_to_onnx(self, masks: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {self.to_initializer(n): self.mask_to_onnx(n, m) for n, m in masks.items()}

    def masks_from_onnx(self, masks: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return dict(self.mask_from_onnx(k, v) for k, v in masks.items())
