"""Operator versions whose semantics another registered version already covers: newer versions that
only widened the accepted types (bfloat16, float8, int4, …: Identity/Reshape/Shape/Cast/… at 19 and
21, onnx.defs changelog), and old versions that opset 9 models still use (Dropout-7, Slice-1, …)."""

from __future__ import annotations

from stages.onnx_convert.ops._base import previous, register, reject_attributes

# (operator, new version, version whose converter applies, attributes that must keep their default)
_SAME_AS = [
    ("Identity", 19, 16, {}),
    ("Identity", 21, 16, {}),
    ("Reshape", 19, 14, {}),
    ("Reshape", 21, 14, {}),
    ("Shape", 19, 15, {}),
    ("Shape", 21, 15, {}),
    ("Cast", 19, 13, {"saturate": 1}),
    ("Cast", 21, 13, {"saturate": 1}),
    ("Constant", 19, 13, {}),
    ("Constant", 21, 13, {}),
    ("ConstantOfShape", 20, 9, {}),
    ("ConstantOfShape", 21, 9, {}),
    ("Transpose", 21, 13, {}),
    ("Flatten", 21, 13, {}),
    ("Unsqueeze", 21, 13, {}),
    ("Equal", 19, 13, {}),
    ("GreaterOrEqual", 16, 12, {}),
    ("LessOrEqual", 16, 12, {}),
    ("IsInf", 20, 10, {}),
    ("IsNaN", 20, 13, {}),
    ("ScatterND", 18, 16, {"reduction": "none"}),
    ("AveragePool", 19, 11, {"dilations": None}),
    ("Slice", 1, 9, {}),  # attribute form: onnx2torch registered it as 9, a version Slice never had
    ("ArgMax", 1, 11, {}),
    ("ArgMin", 1, 11, {}),
    ("DepthToSpace", 1, 11, {}),
    ("NonZero", 9, 13, {}),
    ("IsNaN", 9, 13, {}),
]


def _make(op: str, version: int, base: int, defaults: dict):
    @register(op, version)
    def _convert(node, graph):
        reject_attributes(node, **defaults)
        return previous(op, base)(node, graph)

    return _convert


for _op, _version, _base, _defaults in _SAME_AS:
    _make(_op, _version, _base, _defaults)
