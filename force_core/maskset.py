"""`MaskSet`: parameter name -> bool mask, with densities, kept counts, apply, save and load.

Holds tensors and plain metadata only, never live modules. Imports torch, numpy and the stdlib.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class MaskSet(Mapping[str, torch.Tensor]):
    """Masks keyed by parameter name (as in `model.named_parameters()`); True = connection kept."""

    def __init__(self, masks: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None):
        self._masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            m = torch.as_tensor(m)
            if m.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be a bool tensor, got {m.dtype}")
            self._masks[name] = m
        self.meta: dict[str, Any] = dict(meta or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} layers, density={self.density():.4g}, disconnected={len(self.disconnected)})"

    # Figures
    def kept(self) -> dict[str, int]:
        """Kept weights per layer."""
        counts = torch.stack([torch.count_nonzero(m) for m in self._masks.values()]).tolist() if self._masks else []
        return dict(zip(self._masks, counts, strict=True))

    def sizes(self) -> dict[str, int]:
        """Prunable weights per layer."""
        return {n: m.numel() for n, m in self._masks.items()}

    def total(self) -> int:
        """Number of prunable weights (kept or not)."""
        return sum(m.numel() for m in self._masks.values())

    def total_kept(self) -> int:
        return sum(self.kept().values())

    def density(self) -> float:
        """Global kept fraction over all prunable weights."""
        total = self.total()
        return self.total_kept() / total if total else 1.0

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def layer_density(self) -> dict[str, float]:
        sizes = self.sizes()
        return {n: k / sizes[n] for n, k in self.kept().items()}

    @property
    def disconnected(self) -> list[str]:
        """Layers left with no weight at all: the network is cut there."""
        return [n for n, k in self.kept().items() if k == 0]

    # Use
    def to(self, device: torch.device | str) -> MaskSet:
        return MaskSet({n: m.to(device) for n, m in self._masks.items()}, self.meta)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of `model` in place (names and shapes are checked first)."""
        params = dict(model.named_parameters())
        missing = [n for n in self._masks if n not in params]
        if missing:
            raise ValueError(f"masked parameters not in the model: {missing[:5]}")
        for n, m in self._masks.items():
            if params[n].shape != m.shape:
                raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, parameter has {tuple(params[n].shape)}")
        for n, m in self._masks.items():
            p = params[n]
            p.mul_(m.to(device=p.device, dtype=p.dtype))
        return model

    # Files: a .npz of bool arrays (readable without this package) and a JSON sidecar of metadata.
    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (.npz, one bool array per parameter name) and `path` with suffix .json."""
        path = Path(path)
        arrays = {n: m.detach().cpu().numpy() for n, m in self._masks.items()}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
        sidecar = self.summary()
        side = path.with_suffix(".json")
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str))
        os.replace(tmp, side)
        return path

    def summary(self) -> dict[str, Any]:
        kept = self.kept()
        total = self.total()
        return {
            "meta": self.meta,
            "total": total,
            "kept_total": sum(kept.values()),
            "density": sum(kept.values()) / total if total else 1.0,
            "kept": kept,
            "sizes": self.sizes(),
            "disconnected": [n for n, k in kept.items() if k == 0],
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        path = Path(path)
        with np.load(path, allow_pickle=False) as data:
            masks = {n: torch.from_numpy(data[n].astype(bool, copy=False)) for n in data.files}
        side = path.with_suffix(".json")
        meta = json.loads(side.read_text()).get("meta", {}) if side.exists() else {}
        return cls(masks, meta)
