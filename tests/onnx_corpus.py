"""A corpus of real ONNX exports for the import/export tests: torchvision architectures through the
TorchScript exporter (opsets 11-20, constant folding on and off) and the dynamo exporter, the `light_*`
models shipped inside the onnx package, and hand-built graphs (MLPs as MatMul+Add and as Gemm, a tied
weight). Inputs are small (16-32 px) and weights are re-drawn so that every output depends on them.

`build(case_id, directory)` writes `<directory>/<case_id>.onnx` once and returns its path.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import torch
from onnx import numpy_helper
from torch import nn

IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads up to 13
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], None]
    slow: bool = False
    error: str | None = None  # expected clear error (exception class name) instead of success
    match: str = ""  # ... and a fragment of its message


# --- torch modules ----------------------------------------------------------------------------------
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """torchvision zero-initialises some heads and BatchNorm statistics are trivial at init: re-draw
    them so that parity compares something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _tv(arch: str, **kwargs) -> nn.Module:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _randomize(torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs))


def _vgg11_bn_small() -> nn.Module:
    # the real vgg11_bn features; its 120M-parameter classifier (sized for 224 px) swapped for a small head
    model = _tv("vgg11_bn")
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))
    return _randomize(model)


def _tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _randomize(VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                            mlp_dim=64, num_classes=10))


class _Conv1dNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(16, 10))


class _DepthwiseNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                         nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class _FixedBatchNet(nn.Module):
    """Exported with batch 1 and no dynamic axes: the Reshape target hard-codes the batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(1, -1))


def _seeded(cls) -> Callable[[], nn.Module]:
    def make():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _randomize(cls())

    return make


def _export(make: Callable[[], nn.Module], shape: tuple[int, ...], *, opset: int = 17, dynamo: bool = False,
            fold: bool = True, dynamic_batch: bool = True, batch: int = 2) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        model = make()
        x = torch.randn(batch, *shape)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:
                kw = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic_batch else {}
                torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset,
                                  input_names=["input"], output_names=["logits"], **kw)
            else:
                kw = ({"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}} if dynamic_batch else {})
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                                  do_constant_folding=fold, input_names=["input"], output_names=["logits"], **kw)

    return build


# --- hand-built graphs ------------------------------------------------------------------------------
def _save(path: Path, nodes, inits: dict[str, np.ndarray], in_shape, out_shape, opset: int = 17,
          extra_opsets: dict[str, int] | None = None, batch: int | str = "N") -> None:
    """Float initializers are stored as float32, int ones (shapes, repeats) as int64; `batch` an int: fixed."""
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, *in_shape])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, *out_shape])],
                          [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind in "iu" else np.float32), k)
                           for k, v in inits.items()])
    opsets = [oh.make_opsetid("", opset)] + [oh.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = oh.make_model(graph, opset_imports=opsets, producer_name="onnx.helper")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _rng():
    return np.random.default_rng(0)


def _mlp_matmul(path: Path) -> None:
    r = _rng()
    _save(path, [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Add", ["h", "b1"], ["a"]),
                 oh.make_node("Relu", ["a"], ["r"]), oh.make_node("MatMul", ["r", "w2"], ["m"]),
                 oh.make_node("Add", ["m", "b2"], ["y"])],
          {"w1": r.normal(size=(16, 32)) * 0.3, "b1": r.normal(size=32) * 0.1,
           "w2": r.normal(size=(32, 10)) * 0.3, "b2": r.normal(size=10) * 0.1}, [16], [10])


def _mlp_gemm(trans_b: int, alpha: float, beta: float) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        r = _rng()
        w1 = r.normal(size=(32, 16)) * 0.3  # (out, in)
        w2 = r.normal(size=(10, 32)) * 0.3
        if not trans_b:
            w1, w2 = w1.T, w2.T
        _save(path, [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=trans_b, alpha=alpha, beta=beta),
                     oh.make_node("Relu", ["h"], ["r"]),
                     oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=trans_b, alpha=alpha, beta=beta)],
              {"w1": w1, "b1": r.normal(size=32) * 0.1, "w2": w2, "b2": r.normal(size=10) * 0.1}, [16], [10])

    return build


def _mlp_wide(path: Path) -> None:
    """Big enough weights that storage figures are about weights, not the graph."""
    r = _rng()
    _save(path, [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Add", ["h", "b1"], ["a"]),
                 oh.make_node("Relu", ["a"], ["r"]), oh.make_node("MatMul", ["r", "w2"], ["h2"]),
                 oh.make_node("Relu", ["h2"], ["r2"]), oh.make_node("Gemm", ["r2", "w3", "b3"], ["y"], transB=1)],
          {"w1": r.normal(size=(64, 256)) * 0.1, "b1": np.zeros(256), "w2": r.normal(size=(256, 256)) * 0.1,
           "w3": r.normal(size=(10, 256)) * 0.1, "b3": np.zeros(10)}, [64], [10])


def _tied_matmul(path: Path) -> None:
    """One weight feeds two MatMuls (a tie by design): it stays one tensor, one mask, one initializer."""
    r = _rng()
    _save(path, [oh.make_node("MatMul", ["x", "w"], ["h1"]), oh.make_node("Relu", ["h1"], ["r1"]),
                 oh.make_node("MatMul", ["r1", "w"], ["h2"]), oh.make_node("Add", ["h2", "b"], ["a"]),
                 oh.make_node("MatMul", ["a", "head"], ["y"])],
          {"w": r.normal(size=(16, 16)) * 0.3, "b": np.zeros(16), "head": r.normal(size=(16, 10)) * 0.3}, [16], [10])


def _shared_bias(path: Path) -> None:
    """Two Gemms share one all-zero bias (as the exporter de-duplicates it): un-shared on import."""
    r = _rng()
    _save(path, [oh.make_node("Gemm", ["x", "w1", "zeros"], ["h"], transB=1), oh.make_node("Relu", ["h"], ["r"]),
                 oh.make_node("Gemm", ["r", "w2", "zeros"], ["y"], transB=1)],
          {"w1": r.normal(size=(16, 16)) * 0.3, "w2": r.normal(size=(16, 16)) * 0.3, "zeros": np.zeros(16)},
          [16], [16])


def _custom_op(path: Path) -> None:
    _save(path, [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Swish", ["h"], ["y"], domain="custom.ops")],
          {"w": np.ones((16, 10))}, [16], [10], extra_opsets={"custom.ops": 1})


def _pool_net(op: str, size: int, out: int | None, **attrs) -> Callable[[Path], None]:
    """Conv -> Relu -> a pool with `attrs` (asymmetric pads) -> Flatten -> Gemm, every pooled value feeding the
    head; `out`: the pooled size, so that the Gemm fits. `out` None: GlobalAveragePool before the head (onnx's
    shape inference and onnxruntime's kernel disagree on the size of some ceil_mode pools)."""

    def build(path: Path) -> None:
        r = _rng()
        features = 6 * out * out if out else 6
        flat = [oh.make_node("Flatten", ["p"], ["f"])] if out else [
            oh.make_node("GlobalAveragePool", ["p"], ["g"]), oh.make_node("Flatten", ["g"], ["f"])]
        _save(path, [oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                     oh.make_node("Relu", ["c"], ["r"]), oh.make_node(op, ["r"], ["p"], **attrs), *flat,
                     oh.make_node("Gemm", ["f", "head", "hb"], ["y"], transB=1)],
              {"w": r.normal(size=(6, 3, 3, 3)) * 0.3, "b": r.normal(size=6) * 0.1,
               "head": r.normal(size=(10, features)) * 0.1, "hb": np.zeros(10)}, [3, size, size], [10])

    return build


def _split18_uneven(path: Path) -> None:
    """Split-18 with num_outputs=3 over 8 features: chunks of 3, 3 and the smaller last one, 2."""
    r = _rng()
    _save(path, [oh.make_node("MatMul", ["x", "w1"], ["h"]),
                 oh.make_node("Split", ["h"], ["a", "b", "c"], axis=1, num_outputs=3),
                 oh.make_node("Relu", ["a"], ["ra"]), oh.make_node("Sigmoid", ["b"], ["sb"]),
                 oh.make_node("Tanh", ["c"], ["tc"]), oh.make_node("Concat", ["tc", "ra", "sb"], ["cat"], axis=1),
                 oh.make_node("MatMul", ["cat", "w2"], ["y"])],
          {"w1": r.normal(size=(16, 8)) * 0.3, "w2": r.normal(size=(8, 10)) * 0.3}, [16], [10], opset=18)


def _tokens_batch1(path: Path) -> None:
    """Exported at batch 1 with the batch baked in: a patch embedding reshaped with target [1, 16, 4], a class
    token from Expand to [1, 1, 16] and two register tokens from Tile by [1, 1, 1], concatenated with the patches."""
    r = _rng()
    _save(path, [oh.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
                 oh.make_node("Reshape", ["c", "flat"], ["f"]), oh.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1]),
                 oh.make_node("Expand", ["cls", "cls_shape"], ["cls_b"]),
                 oh.make_node("Tile", ["reg", "reg_repeats"], ["reg_b"]),
                 oh.make_node("Concat", ["cls_b", "reg_b", "t"], ["seq"], axis=1),
                 oh.make_node("ReduceMean", ["seq"], ["m"], axes=[1], keepdims=0),
                 oh.make_node("Gemm", ["m", "head", "hb"], ["y"], transB=1)],
          {"w": r.normal(size=(16, 3, 4, 4)) * 0.2, "b": r.normal(size=16) * 0.1, "flat": np.array([1, 16, 4]),
           "cls": r.normal(size=(1, 1, 16)), "cls_shape": np.array([1, 1, 16]), "reg": r.normal(size=(1, 2, 16)),
           "reg_repeats": np.array([1, 1, 1]), "head": r.normal(size=(10, 16)) * 0.3, "hb": np.zeros(10)},
          [3, 8, 8], [10], batch=1)


class _TokenNet(nn.Module):
    """A class token and register tokens concatenated with patch embeddings; exported at batch 1 by the dynamo
    exporter, which folds `expand(n, -1, -1)` and `tile` into batch-1 initializers."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.reg = nn.Parameter(torch.randn(1, 2, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        n = x.shape[0]
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(torch.cat([self.cls.expand(n, -1, -1), self.reg.tile(n, 1, 1), t], dim=1).mean(1))


def _light(name: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        path.write_bytes((LIGHT_DIR / f"{name}.onnx").read_bytes())

    return build


# --- the corpus ---------------------------------------------------------------------------------------
IMG = (3, 32, 32)
SMALL = (3, 16, 16)
CASES: dict[str, Case] = {
    # torchvision architectures, TorchScript exporter (constant folding off keeps BatchNorm nodes)
    "resnet18_ts18": Case(_export(lambda: _tv("resnet18"), IMG, opset=18, fold=False)),
    "resnet50_ts17": Case(_export(lambda: _tv("resnet50"), IMG, opset=17), slow=True),
    "vgg11_bn_ts17_nofold": Case(_export(_vgg11_bn_small, IMG, opset=17, fold=False)),
    "densenet121_ts17": Case(_export(lambda: _tv("densenet121"), IMG, opset=17), slow=True),
    "efficientnet_b0_ts18": Case(_export(lambda: _tv("efficientnet_b0"), IMG, opset=18)),
    "vit_tiny_ts20": Case(_export(_tiny_vit, SMALL, opset=20)),  # Gelu-20, LayerNormalization, MatMul weights
    "vit_tiny_ts17_nofold": Case(_export(_tiny_vit, SMALL, opset=17, fold=False)),
    # the dynamo exporter (torch.export + onnxscript)
    "resnet18_dynamo18": Case(_export(lambda: _tv("resnet18"), IMG, opset=18, dynamo=True), slow=True),
    "mobilenet_v3_small_dynamo20": Case(_export(lambda: _tv("mobilenet_v3_small"), IMG, opset=20, dynamo=True),
                                        slow=True),
    "vit_tiny_dynamo18": Case(_export(_tiny_vit, SMALL, opset=18, dynamo=True)),
    # a fixed batch the dynamo exporter merged with the attention heads (Reshape to [5, batch * heads, 16]): a
    # clear error naming the node
    "vit_tiny_dynamo18_batch1": Case(_export(_tiny_vit, SMALL, opset=18, dynamo=True, dynamic_batch=False, batch=1),
                                     error="UnsupportedOperatorError", match=r"fixed batch size.*Name:'node_view_\d+'"),
    # fixed batch 1 rewritten: channel shuffles (Reshape targets from Constant -> Unsqueeze -> Concat chains), a
    # class token and register tokens folded into batch-1 initializers
    "shufflenet_v2_x0_5_ts14_batch1_nofold": Case(_export(lambda: _tv("shufflenet_v2_x0_5"), IMG, opset=14, fold=False,
                                                          dynamic_batch=False, batch=1)),
    "tokens_dynamo18_batch1": Case(_export(_seeded(_TokenNet), SMALL, opset=18, dynamo=True, dynamic_batch=False,
                                           batch=1)),
    # small architectures
    "conv1d_ts17": Case(_export(_seeded(_Conv1dNet), (4, 32), opset=17, fold=False)),
    "depthwise_ts13": Case(_export(_seeded(_DepthwiseNet), SMALL, opset=13, fold=False)),
    "fixed_batch_reshape_ts13": Case(_export(_seeded(_FixedBatchNet), SMALL, opset=13, dynamic_batch=False, batch=1)),
    # hand-built graphs
    "mlp_matmul_add": Case(_mlp_matmul),
    "mlp_gemm_transb1": Case(_mlp_gemm(1, 1.0, 1.0)),
    "mlp_wide": Case(_mlp_wide),
    "mlp_gemm_transb0_alpha": Case(_mlp_gemm(0, 0.5, 2.0)),
    "tied_matmul": Case(_tied_matmul),
    "shared_bias_gemm": Case(_shared_bias),
    "custom_op": Case(_custom_op, error="UnsupportedOperatorError", match="Swish v1 in domain 'custom.ops'"),
    "tokens_expand_tile_batch1": Case(_tokens_batch1),
    # pools with asymmetric pads, as onnxruntime computes them
    "averagepool_asym_pads_cip0": Case(_pool_net("AveragePool", 9, 4, kernel_shape=[3, 3], strides=[2, 2],
                                                 pads=[0, 0, 1, 1], count_include_pad=0)),
    "averagepool_asym_pads_cip1_ceil": Case(_pool_net("AveragePool", 9, 5, kernel_shape=[3, 3], strides=[2, 2],
                                                      pads=[1, 0, 0, 1], count_include_pad=1, ceil_mode=1)),
    "maxpool_asym_pads_ceil": Case(_pool_net("MaxPool", 8, None, kernel_shape=[2, 2], strides=[2, 2],
                                             pads=[0, 0, 1, 1], ceil_mode=1)),
    "split18_uneven": Case(_split18_uneven),
}
# the TorchScript exporter across opsets, constant folding on and off (the default run keeps one of each
# opset, alternating folding)
for _i, _opset in enumerate((11, 13, 17, 18, 20)):
    for _fold in (True, False):
        CASES[f"mobilenet_v3_small_ts{_opset}_{'fold' if _fold else 'nofold'}"] = Case(
            _export(lambda: _tv("mobilenet_v3_small"), IMG, opset=_opset, fold=_fold), slow=_fold == bool(_i % 2))
CASES["resnet18_ts11_fold"] = Case(_export(lambda: _tv("resnet18"), IMG, opset=11), slow=True)
# the light_* models inside the onnx package: IR 3, opset 9, weights from ConstantOfShape, initializers as
# inputs, batch fixed at 1, 224 px (light_inception_v1: an AveragePool with pads [0, 0, 1, 1])
for _p in sorted(LIGHT_DIR.glob("light_*.onnx")):
    CASES[_p.stem] = Case(_light(_p.stem), slow=_p.stem != "light_squeezenet")


def build(case_id: str, directory: Path) -> Path:
    path = Path(directory) / f"{case_id}.onnx"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        CASES[case_id].build(tmp)
        tmp.rename(path)
    return path
