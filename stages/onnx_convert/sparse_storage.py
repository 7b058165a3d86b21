"""Sparse initializers: initializers stored as (values, int64 linear indices) where that is smaller, and back."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

_INDEX_BYTES = 8  # ONNX sparse indices are int64
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def to_sparse_initializers(model: onnx.ModelProto, only: set[str] | None = None,
                           dtypes: tuple[int, ...] = FLOATS) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` where each initializer of `dtypes` (in `only`, if given) whose sparse form is smaller
    (values + int64 linear indices, so above roughly two-thirds zeros for float32) is a sparse_initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    keep, chosen = [], []
    for t in graph.initializer:
        if (only is not None and t.name not in only) or t.data_type not in dtypes:
            keep.append(t)
            continue
        value = numpy_helper.to_array(t)
        flat = value.reshape(-1)
        nz = np.flatnonzero(flat)
        if nz.size * (value.itemsize + _INDEX_BYTES) >= value.nbytes:
            keep.append(t)
            continue
        sparse = onnx.SparseTensorProto()
        sparse.dims.extend(value.shape)
        sparse.values.CopyFrom(numpy_helper.from_array(flat[nz], t.name))
        sparse.indices.CopyFrom(numpy_helper.from_array(nz.astype(np.int64), f"{t.name}__indices"))
        graph.sparse_initializer.append(sparse)
        chosen.append(t.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out, chosen


def sparse_initializer_bytes(model: onnx.ModelProto) -> bytes:
    """The model serialised with every float initializer stored sparse where that is smaller."""
    return to_sparse_initializers(model)[0].SerializeToString()


def densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every sparse_initializer of its main graph written back as a dense initializer."""
    if not model.graph.sparse_initializer:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for st in out.graph.sparse_initializer:
        values = numpy_helper.to_array(st.values)
        dense = np.zeros(math.prod(st.dims), values.dtype)
        indices = numpy_helper.to_array(st.indices)
        if indices.ndim == 2:  # [NNZ, rank] coordinates instead of linear indices
            indices = np.ravel_multi_index(indices.T, tuple(st.dims))
        dense[indices] = values
        out.graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(st.dims)), st.values.name))
    del out.graph.sparse_initializer[:]
    return out
