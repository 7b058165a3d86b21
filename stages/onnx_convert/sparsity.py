"""Zeros stored in an ONNX file: per prunable weight, over all prunable weights, and over every float
parameter, subgraphs and sparse initializers included. What `inspect` shows and what the validation gate
measures: the one definition of "sparsity of a file"."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import FLOAT_TYPES, weight_index


@dataclass(frozen=True)
class LayerSparsity:
    """One prunable initializer as stored in the file."""

    name: str
    op: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def density(self) -> float:
        return 1.0 - self.zeros / self.numel if self.numel else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


@dataclass(frozen=True)
class FileSparsity:
    """Zeros counted in an ONNX file: prunable weights (per layer and global) and all float parameters."""

    layers: tuple[LayerSparsity, ...]
    prunable_total: int
    prunable_zeros: int
    params_total: int
    params_zeros: int

    @property
    def sparsity(self) -> float:
        return self.prunable_zeros / self.prunable_total if self.prunable_total else 0.0

    @property
    def params_sparsity(self) -> float:
        return self.params_zeros / self.params_total if self.params_total else 0.0


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _float_tensors(graph: onnx.GraphProto, base_dir: str) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """name -> (shape, numel, zeros) of the float initializers, dense and sparse ones (external data read from
    `base_dir`)."""
    out = {}
    for t in graph.initializer:
        if t.data_type in FLOAT_TYPES:
            a = numpy_helper.to_array(t, base_dir)
            out[t.name] = (tuple(a.shape), int(a.size), int(a.size - np.count_nonzero(a)))
    for st in graph.sparse_initializer:
        if st.values.data_type in FLOAT_TYPES:
            shape = tuple(int(d) for d in st.dims)
            numel = math.prod(shape)
            nonzero = int(np.count_nonzero(numpy_helper.to_array(st.values)))
            out[st.values.name] = (shape, numel, numel - nonzero)
    return out


def _dequantized_tensors(graph: onnx.GraphProto, base_dir: str) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """Outputs of DequantizeLinear nodes over quantized initializers (a QDQ model's weights) -> (shape, numel,
    zeros): an entry dequantizes to exactly 0.0 where it equals its zero point."""
    inits = {t.name: t for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]], base_dir)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = numpy_helper.to_array(inits[zp_name], base_dir) if zp_name in inits else np.zeros((), q.dtype)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if zp.ndim == 1 and q.ndim > 1:  # per channel: broadcast the zero points along `axis`
            zp = zp.reshape([-1 if d == axis % q.ndim else 1 for d in range(q.ndim)])
        out[node.output[0]] = (tuple(q.shape), int(q.size), int(np.count_nonzero(q == zp)))
    return out


def file_sparsity(model: onnx.ModelProto, base_dir: str | os.PathLike = "") -> FileSparsity:
    """Zeros in the prunable weights (initializers feeding a Conv/ConvTranspose/Gemm/MatMul weight input,
    directly or through a DequantizeLinear in a quantized model) and in all float parameters, subgraphs
    included. A model loaded without its external data reads it from `base_dir`: the model file's directory, never
    the working directory."""
    layers, seen = [], set()
    params_total = params_zeros = 0
    for graph in _graphs(model.graph):
        tensors = {**_float_tensors(graph, str(base_dir)), **_dequantized_tensors(graph, str(base_dir))}
        for _shape, numel, zeros in tensors.values():
            params_total += numel
            params_zeros += zeros
        for node in graph.node:
            idx = weight_index(node, tensors)
            if idx is not None and node.input[idx] not in seen:
                name = node.input[idx]
                seen.add(name)
                shape, numel, zeros = tensors[name]
                if len(shape) >= 2:  # a 1-D operand is a bias-like vector, not a weight matrix
                    layers.append(LayerSparsity(name, node.op_type, shape, numel, zeros))
    return FileSparsity(
        layers=tuple(layers),
        prunable_total=sum(l.numel for l in layers),
        prunable_zeros=sum(l.zeros for l in layers),
        params_total=params_total,
        params_zeros=params_zeros,
    )
