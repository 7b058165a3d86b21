"""What one weight of each layer costs in time on the runtime that runs the model: the price `--budget latency`
weighs channels with. Each weight layer (Conv, ConvTranspose, Gemm, MatMul with a weight) is timed alone by
onnxruntime at the user's batch and its own input shape, with all its output channels and with half of them (in
whole blocks of `multiple`), the two in the same interleaved rounds; the time saved over the weights removed is the
layer's marginal time per weight (a latency lookup at two points, as HALP's tables, Shen et al. 2022). A layer whose
time is mostly fixed overhead gets a low price, so its channels are cheap to keep; one whose time grows with its
channels is priced by that growth. MACs do not see either: a 1×1 convolution and a depthwise one of equal MACs differ
several-fold in time.

Timings are cached per layer (operator, attributes, shapes), batch, provider and machine in
`$FORCE_COMPRESS_CACHE` (default `~/.cache/force-compress`), `layer_latency.json`: a second run on the same model
and machine measures nothing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import numpy_helper

from pipeline.artifacts import atomic_path
from stages.measure.latency import interleaved_latency
from stages.onnx_convert import runtime
from stages.onnx_convert.costs import macs_per_weight, shaped_at
from stages.onnx_convert.passes._graph import weight_index

CACHE_FILE = "layer_latency.json"
CACHE_VERSION = 2  # bumped when what an entry holds changes
PS_PER_MS = 1e9  # prices are integers (force_core's costs): picoseconds per weight


def latency_prices(model: onnx.ModelProto, input_shape: tuple[int, ...], *, batch: int = 1, device: str = "cpu",
                   multiple: int = 1, runs: int = 12, budget_s: float = 1.5,
                   cache_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Initializer -> picoseconds one of its weights costs at `batch` images of `input_shape` (C, H, W) on `device`'s
    onnxruntime provider (≥ 1). A layer that cannot be timed alone (shapes unknown to inference) is priced by its
    MACs at the median time per MAC of the layers that were."""
    shaped, shapes, _ = shaped_at(model, tuple(input_shape))
    inits = {t.name: t for t in shaped.graph.initializer}
    per_mac = macs_per_weight(model, tuple(input_shape))
    path = _cache_path(cache_dir)
    cache = _read_cache(path)
    machine = _machine(device)
    prices: dict[str, float] = {}
    fresh = False
    for node in shaped.graph.node:
        k = weight_index(node, inits)
        w = node.input[k] if k is not None else ""
        if not w or w in prices or w not in per_mac:
            continue
        layer = _layer(node, k, shapes, inits, batch, multiple)
        if layer is None:
            continue
        full, half, removed = layer
        key = hashlib.sha256(json.dumps([CACHE_VERSION, machine, batch, _signature(full)]).encode()).hexdigest()[:24]
        if key not in cache:
            sessions = [runtime.session(m.SerializeToString(), device=device) for m in (full, half)]
            x_shape = tuple(int(d.dim_value) for d in full.graph.input[0].type.tensor_type.shape.dim[1:])
            timed = interleaved_latency(sessions, x_shape, batch=batch, runs=runs, budget_s=budget_s)
            saved = np.median(np.subtract(timed[0]["times"], timed[1]["times"]))  # per round: load hits both
            cache[key] = {"full_ms": timed[0]["p50"], "half_ms": timed[1]["p50"], "saved_ms": float(saved),
                          "removed": removed}
            fresh = True
        entry = cache[key]
        prices[w] = max(entry["saved_ms"], 0.0) / max(entry["removed"], 1)
    if fresh:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**_read_cache(path), **cache}))
    timed_ps = [prices[w] * PS_PER_MS / per_mac[w] for w in prices if per_mac[w] > 0 and prices[w] > 0]
    fallback = float(np.median(timed_ps)) if timed_ps else 1.0
    return {w: max(1, round(prices[w] * PS_PER_MS)) if w in prices else max(1, round(fallback * per_mac[w]))
            for w in per_mac}


def _layer(node: onnx.NodeProto, k: int, shapes: dict, inits: dict, batch: int, multiple: int):
    """(the layer alone, the same with half its output channels, the weights that removes), or None when its shapes
    are not all known or it has no half to time."""
    w = inits[node.input[k]]
    x = shapes.get(node.input[0])
    if k != 1 or not x or any(v is None or v <= 0 for v in x):
        return None
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    group = int(attrs.get("group", 1))
    wdims = tuple(w.dims)
    axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if attrs.get("transB", 0) else 1}.get(node.op_type)
    if node.op_type == "MatMul" and len(wdims) == 2:
        axis = 1
    if axis is None or (node.op_type == "ConvTranspose" and group > 1):
        return None
    out = wdims[axis]
    half = max(multiple, (out // 2) // multiple * multiple)
    if half >= out or (group > 1 and group * half % out):
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None

    def build(n_out: int) -> onnx.ModelProto:
        a, wd, xd = dict(attrs), list(wdims), [batch, *x[1:]]
        wd[axis] = n_out
        if group > 1:  # a grouped convolution keeps whole groups: its input shrinks with its output
            a["group"] = group * n_out // out
            xd[1] = x[1] * n_out // out
        tensors = [numpy_helper.from_array(np.random.default_rng(0).standard_normal(wd).astype(np.float32), "W")]
        inputs = ["X", "W"]
        if bias is not None:
            bd = list(inits[bias].dims)
            if bd and bd[-1] == out:
                bd[-1] = n_out
            tensors.append(numpy_helper.from_array(np.zeros(bd, np.float32), "B"))
            inputs.append("B")
        graph = oh.make_graph([oh.make_node(node.op_type, inputs, ["Y"], **a)], "layer",
                              [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, xd)],
                              [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], tensors)
        m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    return build(out), build(half), math.prod(wdims) * (out - half) // out


def _signature(m: onnx.ModelProto) -> list:
    node = m.graph.node[0]
    return [node.op_type, sorted((a.name, str(oh.get_attribute_value(a))) for a in node.attribute),
            [list(t.dims) for t in m.graph.initializer],
            [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]]


def _machine(device: str) -> list:
    cpu = platform.processor()
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return [platform.machine(), cpu, os.cpu_count(), ort.__version__, device]


def _cache_path(cache_dir) -> Path:
    root = cache_dir or os.environ.get("FORCE_COMPRESS_CACHE") or Path.home() / ".cache" / "force-compress"
    return Path(root) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measured again and rewritten
        return {}
