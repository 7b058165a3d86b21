"""LayerNormalization whose normalized shape shape inference lost: onnx2torch reads it from the input's value_info,
where a dynamic axis reads as 0 (mobilevit's attention, after reshapes around a dynamic batch, gives
normalized_shape [0] and fails at run time). The scale initializer holds the normalized shape by the operator's
definition (its shape is the input's from `axis` on), so it is read from there."""

from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_shape_from_value_info
from torch import nn

from stages.onnx_convert.ops._base import override


def _from_scale(node, graph, fallback):
    axis = node.attributes.get("axis", -1)
    epsilon = node.attributes.get("epsilon", 1e-5)
    names = node.input_values
    if not all(n in graph.initializers for n in names[1:]):
        return fallback(node, graph)
    shape = list(get_shape_from_value_info(graph.value_info[names[0]])) if names[0] in graph.value_info else []
    if shape and all(d > 0 for d in shape[axis:]):
        return fallback(node, graph)  # known: onnx2torch's own
    rank = -axis if axis < 0 else len(shape) - axis if shape else None  # how many axes are normalized
    scale = graph.initializers[names[1]].to_torch()
    if rank is None or scale.dim() != rank:
        return fallback(node, graph)  # a broadcast scale: the normalized shape is not in it
    module = nn.LayerNorm(normalized_shape=tuple(scale.shape), eps=epsilon, elementwise_affine=True)
    with torch.no_grad():
        module.weight.data = scale
        if len(names) > 2:
            module.bias.data = graph.initializers[names[2]].to_torch()
        else:
            module.bias.data = torch.zeros_like(scale)
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=(names[0],),
                                                                                  outputs=node.output_values))


override("LayerNormalization", 17, _from_scale)
