"""ONNX ↔ PyTorch plumbing for the import and export stages: converters for operator versions newer
than onnx2torch knows (`ops/`), normalisation passes (`passes/`), the ParamMap and the checked loader.

Imports onnx, onnx2torch, torch and `pipeline`; never flows, prefect or click.
"""
