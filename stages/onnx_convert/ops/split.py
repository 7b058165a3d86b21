"""Split at 18: new `num_outputs` attribute; sizes still come from the `split` input or the outputs
(onnx2torch's equal split needs an exact divisor, where v18 allows a smaller last chunk)."""

from __future__ import annotations

from stages.onnx_convert.ops._base import previous, register


@register("Split", 18)
def _convert(node, graph):
    n = node.attributes.get("num_outputs")
    has_split = len(node.input_values) > 1 and node.input_values[1]
    if n is not None and not has_split and n != len(node.output_values):
        raise NotImplementedError(f"num_outputs={n} differs from the {len(node.output_values)} outputs")
    return previous("Split", 13)(node, graph)
