"""onnxruntime sessions for checks (parity, round trips): CPU unless CUDA is really there."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from pipeline.devices import ort_providers
from pipeline.errors import InvalidModelError, UnsupportedOperatorError


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

