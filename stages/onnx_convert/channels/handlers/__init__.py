"""The channel handlers, one module per operator family; importing this package registers them all in
`stages.onnx_convert.channels.registry.HANDLERS`."""

from stages.onnx_convert.channels.handlers import (
    axes,
    concat_split,
    elementwise,
    linear,
    norm,
    pad_resize,
    reduce,
    reshape,
    shape_read,
)

__all__ = ["axes", "concat_split", "elementwise", "linear", "norm", "pad_resize", "reduce", "reshape", "shape_read"]
