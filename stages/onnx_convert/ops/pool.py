"""AveragePool and MaxPool with different pads at the two ends of an axis (`pads` = [0, 0, 1, 1], or `auto_pad`
SAME_UPPER / SAME_LOWER). onnx2torch refuses them for AveragePool, and for MaxPool with ceil_mode it pads first
and lets torch's ceil rule add a window onnxruntime does not have. Here the pads are explicit, the output size
is onnxruntime's, and an average divides by onnxruntime's count: the real elements (count_include_pad=0) or
the window clipped to the padded input (count_include_pad=1: pads count, the part of a ceil_mode window past
the padded edge does not). Symmetric pads keep onnx2torch's converter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from stages.onnx_convert.ops._base import override

# the max pool stays an nn.MaxPoolNd (over explicitly padded input): force_core's effective-sparsity pass
# recognises it by type and counts every window position as on a path
_MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class OnnxPaddedPool(nn.Module, OnnxToTorchModule):
    def __init__(self, mode: str, kernel: list[int], strides: list[int], dilations: list[int], pads: list[int],
                 auto_pad: str, ceil_mode: bool, count_include_pad: bool):
        super().__init__()
        self.mode, self.kernel, self.strides, self.dilations = mode, kernel, strides, dilations
        self.pads, self.auto_pad, self.ceil_mode, self.count_include_pad = pads, auto_pad, ceil_mode, count_include_pad
        if mode == "max":
            self.pool = _MAX[len(kernel)](kernel, strides, 0, dilations)

    def _geometry(self, sizes) -> tuple[list[int], list[int], list[int], list[int]]:
        """Per spatial axis: pad before, pad after, extra pad after (ceil_mode windows past the padded edge),
        output size; as onnxruntime's pool_attributes.h computes them."""
        rank = len(self.kernel)
        before, after, extra, out = [], [], [], []
        for i, n in enumerate(sizes):
            k, s = (self.kernel[i] - 1) * self.dilations[i] + 1, self.strides[i]
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                # onnxruntime's arithmetic: the undilated kernel, C++ division (a negative total crops the input)
                total = (math.ceil(n / s) - 1) * s + self.kernel[i] - n
                b = int((total + (self.auto_pad == "SAME_LOWER")) / 2)
                e = total - b
            else:
                b, e = self.pads[i], self.pads[i + rank]
            span = n + b + e - k
            size = span // s + 1
            if self.ceil_mode:
                size = -(-span // s) + 1
                if (size - 1) * s >= n + b:  # the last window must start inside the input or its leading pad
                    size -= 1
            before.append(b)
            after.append(e)
            extra.append(max(0, (size - 1) * s + k - (n + b + e)))
            out.append(size)
        return before, after, extra, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = len(self.kernel)
        before, after, extra, out = self._geometry(x.shape[-rank:])
        pads = [p for i in reversed(range(rank)) for p in (before[i], after[i] + extra[i])]  # F.pad: last axis first
        if self.mode == "max":
            y = self.pool(F.pad(x, pads, value=-math.inf))
        else:
            ones = x.new_ones((1, 1, *x.shape[-rank:]))
            if self.count_include_pad:  # pads count as elements, the ceil_mode overhang does not
                ones = F.pad(ones, [p for i in reversed(range(rank)) for p in (before[i], after[i])], value=1.0)
                count = F.pad(ones, [p for i in reversed(range(rank)) for p in (0, extra[i])])
            else:
                count = F.pad(ones, pads)
            # both averages divide by the kernel size: their ratio is sum / count
            y = _AVG[rank](F.pad(x, pads), self.kernel, self.strides) / _AVG[rank](count, self.kernel, self.strides)
        return y[(..., *(slice(0, o) for o in out))]


def _padded(node, graph, fallback, mode: str):
    attrs = node.attributes
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    pads = list(attrs.get("pads", [0] * 2 * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER") and (auto_pad == "VALID" or pads[:rank] == pads[rank:]):
        return fallback(node, graph)
    if rank not in _MAX:
        raise NotImplementedError(f"{rank} spatial axes are not supported (1 to 3)")
    if len(node.output_values) > 1:
        raise NotImplementedError("the Indices output together with asymmetric padding is not supported")
    if attrs.get("storage_order", 0) != 0:
        raise NotImplementedError("storage_order=1 is not supported")
    dilations = list(attrs.get("dilations", [1] * rank))
    if mode == "avg" and any(d != 1 for d in dilations):
        raise NotImplementedError(f"dilations={dilations} is not supported for AveragePool")
    module = OnnxPaddedPool(mode, kernel, list(attrs.get("strides", [1] * rank)), dilations, pads, auto_pad,
                            bool(attrs.get("ceil_mode", 0)), bool(attrs.get("count_include_pad", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


for _version in (7, 10, 11):  # AveragePool-19 (ops/type_only.py) goes through 11
    override("AveragePool", _version, lambda node, graph, fallback: _padded(node, graph, fallback, "avg"))
for _version in (8, 10, 11, 12):
    override("MaxPool", _version, lambda node, graph, fallback: _padded(node, graph, fallback, "max"))
