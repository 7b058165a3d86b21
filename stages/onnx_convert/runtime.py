"""onnxruntime sessions for checks (parity, round trips): CPU unless CUDA is really there."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import numpy_helper

from pipeline.devices import ort_providers
from pipeline.errors import InvalidModelError, UnsupportedOperatorError


def timed_session(model: str | os.PathLike | bytes, device: str = "cpu") -> ort.InferenceSession:
    """A session for the latencies the gate checks, and for every latency compared with them (the target-latency
    search): memory arena off. Every form is held at once and timed at batch 32, and each arena keeps its largest
    run's buffers (halonet_h1 at 256×256: 8.3 GB per session, three sessions killed a 24 GiB machine). Timed with
    arenas on, resnet50's cut at batch 32 measured 0.43 of the input's time against the gate's 0.46."""
    return session(model, device=device, arena=False)


def session(model: str | os.PathLike | bytes, device: str = "cpu", threads: int | None = None,
            arena: bool = True) -> ort.InferenceSession:
    """A session on a path or serialised bytes; errors become InvalidModelError (an IR version onnxruntime
    cannot read) or UnsupportedOperatorError, with onnxruntime's message. `threads` None: its default. `arena`
    False: the CPU memory arena is off, so a run's buffers are freed when it ends instead of kept for the next."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    try:
        src = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(src, opts, providers=ort_providers(device))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        msg = " ".join(str(e).split())
        if "IR version" in msg:
            raise InvalidModelError(f"onnxruntime cannot read this model: {msg[:200]}; "
                                    "save it with an IR version onnxruntime supports (e.g. ir_version=10)") from None
        raise UnsupportedOperatorError(f"onnxruntime cannot load the model: {msg[:300]}") from None


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    try:
        return sess.run(None, {name: x})[0]
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())
        raise UnsupportedOperatorError(f"onnxruntime failed to run the model at batch size {x.shape[0]}: "
                                       f"{msg[:300]}") from None


@functools.cache
def channel_block(device: str = "cpu") -> int:
    """The channel count `device`'s onnxruntime computes a convolution's channels in, found by asking it:
    onnxruntime CPU runs convolutions and pools in the NCHWc layout with blocks of MLAS's vector width (16 floats with
    AVX-512, 8 with AVX2). A layer whose channels are not whole blocks is padded up to them (the padding is computed
    and thrown away), and a pool over such channels leaves the layout (two reorders of its whole activation): a
    channel cut in blocks of 8 on an AVX-512 machine ran resnet50 at batch 32 in 0.364 of the dense time where
    blocks of 16 at the same MACs ran in 0.321 (issue 26). The block is the smallest channel count that a
    Conv → MaxPool → Conv chain keeps in the layout, in the graph onnxruntime optimizes; 8 (tensor cores' multiple)
    on CUDA or where the runtime has no such layout."""
    if not device.startswith("cpu"):
        return 8
    for block in (4, 8, 16, 32):
        if _stays_blocked(block):
            return block
    return 8


def _stays_blocked(channels: int) -> bool:
    """Whether onnxruntime CPU keeps a Conv(64 → `channels`) → MaxPool → Conv chain in one blocked layout (no
    reorder between the layers)."""
    weights = [numpy_helper.from_array(np.zeros(shape, np.float32), name)
               for name, shape in (("W1", (channels, 64, 1, 1)), ("W2", (64, channels, 3, 3)))]
    graph = oh.make_graph([oh.make_node("Conv", ["X", "W1"], ["Y"]),
                           oh.make_node("MaxPool", ["Y"], ["P"], kernel_shape=[2, 2]),
                           oh.make_node("Conv", ["P", "W2"], ["Z"], pads=[1, 1, 1, 1])], "block_probe",
                          [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 64, 8, 8])],
                          [oh.make_tensor_value_info("Z", onnx.TensorProto.FLOAT, None)], weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    ops = optimized_ops(model.SerializeToString())
    return "ReorderInput" in ops and ops.count("ReorderOutput") == 1 and ops[-1] == "ReorderOutput"


def optimized_ops(model: str | os.PathLike | bytes) -> list[str]:
    """The operators of the graph onnxruntime CPU runs for `model`, after all its optimizations (layout ones too)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        src = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
