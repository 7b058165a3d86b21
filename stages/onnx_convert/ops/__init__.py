"""Converters registered in onnx2torch's own registry for operator versions it does not know.

onnx2torch 1.5.15 stops at opset 13-16 for many operators while today's exporters write 18-21; each
module here adds one operator family, keyed by (domain, operator, version) like onnx2torch's own.
Importing this package registers them (once).
"""

from stages.onnx_convert.ops import (  # noqa: F401
    cast_like,
    dropout,
    gelu,
    layer_norm,
    pad,
    pool,
    reduce,
    reshape,
    resize,
    size_one_hot,
    split,
    type_only,
)
