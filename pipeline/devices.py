"""Which torch device and which onnxruntime providers to use."""

from __future__ import annotations

import torch

from pipeline.errors import EnvironmentProblem


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("--device cuda was asked for but no CUDA device is present; use --device cpu or auto")
    if spec not in ("cpu", "cuda"):
        raise EnvironmentProblem(f"unknown device {spec!r}; use auto, cpu or cuda")
    return torch.device(spec)


def ort_providers(device: torch.device | str = "cpu") -> list[str]:
    """Ask onnxruntime for CUDA only when a CUDA device is present: otherwise it prints loud errors
    before falling back to CPU."""
    import onnxruntime as ort

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
