"""Pruning masks at initialization (FORCE, Iterative SNIP, SNIP, GraSP, SynFlow, magnitude, random).

Pure PyTorch: imports torch and numpy only, never onnx, onnxruntime, onnx2torch, prefect or click.
"""

def available_methods() -> list[str]:
    # Replaced by the method registry (issue: force_core).
    return ["force", "iter_snip", "snip", "grasp", "synflow", "magnitude", "random"]
