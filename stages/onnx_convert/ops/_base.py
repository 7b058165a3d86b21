"""Helpers shared by the converters: reuse an onnx2torch converter of an earlier version of an operator."""

from __future__ import annotations

from collections.abc import Callable

from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]


def registered(operation_type: str, version: int, domain: str = "") -> Converter | None:
    return _CONVERTER_REGISTRY.get(OperationDescription(domain=domain, operation_type=operation_type, version=version))


def register(operation_type: str, version: int, domain: str = ""):
    """`add_converter` that is a no-op when that version is already registered (a newer onnx2torch
    may ship it; theirs wins)."""

    def deco(fn: Converter) -> Converter:
        if registered(operation_type, version, domain) is None:
            add_converter(operation_type=operation_type, version=version, domain=domain)(fn)
        return fn

    return deco


def previous(operation_type: str, version: int, domain: str = "") -> Converter:
    conv = registered(operation_type, version, domain)
    if conv is None:  # internal: a module here names a version onnx2torch does not have
        raise RuntimeError(f"onnx2torch has no converter for {operation_type} v{version}")
    return conv


def reject_attributes(node: OnnxNode, **defaults) -> None:
    """Raise NotImplementedError (reported as UnsupportedOperatorError) when a newer-version attribute
    has a value the older converter cannot honour."""
    for name, default in defaults.items():
        value = node.attributes.get(name, default)
        if name == "dilations" and value is not None and all(v == 1 for v in value):
            continue  # explicit ones are the default
        if value != default:
            raise NotImplementedError(f"attribute {name}={value!r} is not supported (only {default!r})")


def override(operation_type: str, version: int, wrapper, domain: str = "") -> None:
    """Wrap an already registered converter: `wrapper(node, graph, fallback)` handles what onnx2torch
    refuses and calls `fallback` for the rest. onnx2torch's `add_converter` refuses a second
    registration of the same key, so this replaces the registry entry itself (once)."""
    key = OperationDescription(domain=domain, operation_type=operation_type, version=version)
    fallback = _CONVERTER_REGISTRY[key]
    if getattr(fallback, "_force_compress_wrapped", False):
        return

    def converter(node, graph):
        return wrapper(node, graph, fallback)

    converter._force_compress_wrapped = True
    _CONVERTER_REGISTRY[key] = converter
