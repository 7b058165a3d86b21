"""Channel dependency analysis and surgery on real exports of torchvision architectures (their own init, 32 px,
10 classes) and on small hand-built graphs: random channels kept, the cut model against the masked one under
onnxruntime, the graph around the cut left as it was."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

from stages.onnx_convert import runtime
from stages.onnx_convert.channels import ChannelAnalysis, analyze_channels, cut_channels, mask_channels
from stages.onnx_convert.passes import explicit_bias, normalize
from stages.onnx_convert.torchvision_export import export_torchvision

TOL = 1e-4
SIZE = 32

# case -> (torchvision architecture, exporter)
CASES = {
    "resnet18": ("resnet18", "torchscript"),
    "mobilenet_v2": ("mobilenet_v2", "torchscript"),  # depthwise
    "mobilenet_v3_small": ("mobilenet_v3_small", "torchscript"),  # SE + hardswish
    "mobilenet_v3_small_dynamo": ("mobilenet_v3_small", "dynamo"),  # BatchNorm fused, Reshape into Gemm
    "densenet121": ("densenet121", "torchscript"),  # Concat
    "squeezenet1_0": ("squeezenet1_0", "torchscript"),  # Concat, classifier is a Conv
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", "torchscript"),  # channel shuffle: blocked by name
    "resnext50_32x4d": ("resnext50_32x4d", "torchscript"),  # grouped 3x3 convolutions, 32 groups
    "regnet_y_400mf": ("regnet_y_400mf", "torchscript"),  # grouped convolutions with SE between them
}


def _perturb(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Re-draw the 1-D initializers (biases, norm scale/shift, running mean/var): at torchvision's init they are
    0/1, and a cut that misplaced them would go unseen."""
    g = np.random.default_rng(seed)
    variances = {n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization" and len(n.input) > 4}
    for t in model.graph.initializer:
        if len(t.dims) == 1 and t.data_type == onnx.TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            new = g.uniform(0.5, 1.5, a.shape) if t.name in variances else a + g.normal(0, 0.1, a.shape)
            t.CopyFrom(numpy_helper.from_array(new.astype(np.float32), t.name))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> normalised ModelProto (as import_onnx writes it; BN-fused dynamo exports get explicit biases)."""
    directory = tmp_path_factory.mktemp("channel_cut")
    cache: dict[str, onnx.ModelProto] = {}

    def get(case: str) -> onnx.ModelProto:
        if case not in cache:
            arch, exporter = CASES[case]
            path = directory / f"{case}.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                export_torchvision(arch, path, input_size=(SIZE, SIZE), exporter=exporter)
            model = onnx.load(str(path))
            normalize(model)
            if exporter == "dynamo":
                explicit_bias.run(model)
            cache[case] = _perturb(model)
        copy = onnx.ModelProto()
        copy.CopyFrom(cache[case])
        return copy

    return get


def _random_keep(analysis: ChannelAnalysis, seed: int = 0, density: float = 0.5) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    keep = {}
    for group in analysis.groups:
        k = g.random(group.size) < density
        if not k.any():
            k[g.integers(group.size)] = True
        keep[group.name] = k
    return keep


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.session(model.SerializeToString(), threads=1), x)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _n_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def _input(model: onnx.ModelProto, batch: int = 2) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(1).standard_normal((batch, *dims)).astype(np.float32)


def _without_cut_fields(node: onnx.NodeProto) -> onnx.NodeProto:
    """The node less what a cut may change: a depthwise Conv's `group`, a Reshape's target, a Constant's value."""
    n = onnx.NodeProto()
    n.CopyFrom(node)
    if n.op_type == "Reshape":
        n.input[1] = ""
    keep = [a for a in n.attribute if not (n.op_type == "Conv" and a.name == "group" or n.op_type == "Constant")]
    del n.attribute[:]
    n.attribute.extend(keep)
    return n


def _check_cut(model: onnx.ModelProto, analysis: ChannelAnalysis, keep) -> tuple[onnx.ModelProto, float]:
    """Cut and mask with the same channels; everything a caller relies on about the cut model."""
    cut = cut_channels(model, analysis, keep)
    masked = mask_channels(model, analysis, keep)
    onnx.checker.check_model(cut, full_check=True)
    assert list(cut.graph.input) == list(model.graph.input)
    assert list(cut.graph.output) == list(model.graph.output)
    assert list(cut.opset_import) == list(model.opset_import)
    assert list(cut.metadata_props) == list(model.metadata_props)
    assert cut.ir_version == model.ir_version
    assert len(cut.graph.node) == len(model.graph.node)
    for a, b in zip(cut.graph.node, model.graph.node, strict=True):
        assert a == b or _without_cut_fields(a) == _without_cut_fields(b), f"{b.name} changed:\n{b}\n->\n{a}"
    x = _input(model)
    y_cut, y_masked = _outputs(cut, x), _outputs(masked, x)
    assert y_cut.shape == y_masked.shape == (2, 10)
    return cut, _rel(y_cut, y_masked)


def _blocked_ops(analysis: ChannelAnalysis) -> set[str]:
    return {b.op_type for b in analysis.blocked}


@pytest.mark.parametrize("case", list(CASES))
def test_random_cut_matches_masked_model(case, exported):
    model = exported(case)
    analysis = analyze_channels(model)
    assert analysis.groups, analysis.describe()
    assert len({g.name for g in analysis.groups}) == len(analysis.groups)
    keep = _random_keep(analysis)
    cut, rel = _check_cut(model, analysis, keep)
    assert rel < TOL, f"{case}: cut vs masked max relative difference {rel:.3g}"
    assert _n_params(cut) < 0.75 * _n_params(model)
    # the masked model is not the dense one: the parity above compares something
    x = _input(model)
    assert _rel(_outputs(mask_channels(model, analysis, keep), x), _outputs(model, x)) > 1e-3

    # input channels and classifier outputs untouched; every group's producer lost channels
    source = {t.name: tuple(t.dims) for t in model.graph.initializer}
    after = {t.name: tuple(t.dims) for t in cut.graph.initializer}
    first = next(n for n in model.graph.node if model.graph.input[0].name in n.input)
    assert after[first.input[1]][1] == source[first.input[1]][1] == 3
    heads = {b.node for b in analysis.blocked if "graph output" in b.reason}
    assert heads
    for node in (n for n in model.graph.node if n.name in heads):  # their output rows (Gemm transB=1, Conv)
        assert after[node.input[1]][0] == source[node.input[1]][0] == 10
    assert "graph input" in _blocked_ops(analysis)
    for g in analysis.groups:
        w = next(s for s in g.slices if s.kind == "weight")
        assert after[w.initializer][w.axis] < source[w.initializer][w.axis] or g.size == 1 or keep[g.name].all()


def test_expected_blocked_nodes(exported):
    """Coverage guard: residuals, depthwise, SE, Concat and Flatten/Reshape into Gemm are all understood; only
    the input, the classifier head and ShuffleNet's channel shuffles are blocked."""
    for case in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_small_dynamo", "densenet121",
                 "squeezenet1_0", "resnext50_32x4d", "regnet_y_400mf"):
        analysis = analyze_channels(exported(case))
        assert len(analysis.blocked) == 2, f"{case}:\n{analysis.describe()}"
        assert {b.reason.split(" '")[0] for b in analysis.blocked} == {
            "the network input's channels are fixed", "its output channels reach graph output"}
    shuffle = analyze_channels(exported("shufflenet_v2_x0_5"))
    reshapes = [b for b in shuffle.blocked if b.op_type == "Reshape"]
    assert len(reshapes) == 3 and all(b.node.endswith("/Reshape") for b in reshapes), shuffle.describe()
    # the branches' inner channels (1x1 conv -> depthwise conv -> 1x1 conv) are still pruned
    assert len(shuffle.groups) >= 13


def test_structures_are_grouped_as_the_architecture_says(exported):
    # ResNet: each stage's residual stream is one group spanning its convolutions and the downsample
    resnet = analyze_channels(exported("resnet18"))
    stream = next(g for g in resnet.groups if any(s.initializer == "layer2.0.downsample.0.weight" and s.axis == 0
                                                  for s in g.slices))
    names = {(s.initializer, s.axis) for s in stream.slices}
    assert {("layer2.0.conv2.weight", 0), ("layer2.1.conv2.weight", 0), ("layer2.1.conv1.weight", 1),
            ("layer3.0.conv1.weight", 1), ("layer3.0.downsample.0.weight", 1)} <= names
    assert len(resnet.groups) == 12  # 4 streams + 8 block-internal

    # MobileNetV2: the expansion and its depthwise conv are one group; the depthwise `group` shrinks with it
    mnv2 = exported("mobilenet_v2")
    analysis = analyze_channels(mnv2)
    dw = next(n for n in mnv2.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                       for a in n.attribute))
    group = next(g for g in analysis.groups if any(s.initializer == dw.input[1] for s in g.slices))
    assert any(s.axis == 0 and s.kind == "weight" for s in group.slices if s.initializer == dw.input[1])
    keep = _random_keep(analysis)
    cut = cut_channels(mnv2, analysis, keep)
    node = next(n for n in cut.graph.node if n.name == dw.name)
    assert next(a.i for a in node.attribute if a.name == "group") == int(keep[group.name].sum())

    # MobileNetV3: the SE expansion's output channels are the feature map's; the SE bottleneck is its own group
    for case in ("mobilenet_v3_small", "mobilenet_v3_small_dynamo"):
        analysis = analyze_channels(exported(case))
        fc2 = "features.4.block.2.fc2.weight"
        se_out = next(g for g in analysis.groups if (fc2, 0) in {(s.initializer, s.axis) for s in g.slices})
        assert {"features.4.block.1.0.weight", "features.4.block.3.0.weight"} <= {s.initializer for s in se_out.slices}
        bottleneck = next(g for g in analysis.groups if (fc2, 1) in {(s.initializer, s.axis) for s in g.slices})
        assert ("features.4.block.2.fc1.weight", 0) in {(s.initializer, s.axis) for s in bottleneck.slices}

    # DenseNet: a layer's new channels reach every later layer of the block at a growing Concat offset
    dense = analyze_channels(exported("densenet121"))
    grown = next(g for g in dense.groups if g.producers[0].endswith("denseblock1/denselayer1/conv2/Conv"))
    # read by the BatchNorm and conv1 of denselayers 2-6 and by the transition, each time after the 64 stem channels
    assert grown.size == 32
    assert [s.offset for s in grown.slices if s.kind == "weight" and s.axis == 1] == [64] * 6
    later = next(g for g in dense.groups if g.producers[0].endswith("denseblock1/denselayer2/conv2/Conv"))
    assert [s.offset for s in later.slices if s.kind == "weight" and s.axis == 1] == [96] * 5
    assert {s.kind for s in dense.groups[0].slices} == {"weight", "param", "stat"}


@pytest.mark.parametrize("case", ["resnext50_32x4d", "regnet_y_400mf"])
def test_a_grouped_convolution_prunes_the_same_channels_in_every_group(case, exported):
    model = exported(case)
    analysis = analyze_channels(model)
    grouped = [n for n in model.graph.node if n.op_type == "Conv"
               and 1 < next((a.i for a in n.attribute if a.name == "group"), 1) < _in_channels(model, n)]
    assert grouped
    for node in grouped:
        groups = next(a.i for a in node.attribute if a.name == "group")
        rows = [(g, s) for g in analysis.groups for s in g.slices if s.initializer == node.input[1] and s.axis == 0]
        assert len(rows) == groups and len({g.name for g, _ in rows}) == 1  # one set, a run in every group
        size = rows[0][0].size
        assert sorted(s.offset for _, s in rows) == [k * size for k in range(groups)]
        columns = [(g, s) for g in analysis.groups for s in g.slices if s.initializer == node.input[1] and s.axis == 1]
        per_group = next(t for t in model.graph.initializer if t.name == node.input[1]).dims[1]
        assert [(g.size, s.offset) for g, s in columns] == [(per_group, 0)]  # its input, split alike in every group
    keep = _random_keep(analysis, density=0.5)
    cut, rel = _check_cut(model, analysis, keep)
    assert rel < TOL
    for node in grouped:  # the group count stands, each group smaller
        before = next(t for t in model.graph.initializer if t.name == node.input[1]).dims
        after = next(t for t in cut.graph.initializer if t.name == node.input[1]).dims
        assert after[0] < before[0] and after[1] < before[1]
        assert next(a.i for a in next(n for n in cut.graph.node if n.name == node.name).attribute
                    if a.name == "group") == next(a.i for a in node.attribute if a.name == "group")


def _in_channels(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    dims = next(t for t in model.graph.initializer if t.name == node.input[1]).dims
    return dims[1] * next(a.i for a in node.attribute if a.name == "group")


def test_wrong_cut_is_caught_by_the_parity_check(exported):
    """The parity the pipeline runs before training can fail: one channel kept differently fails it."""
    model = exported("resnet18")
    analysis = analyze_channels(model)
    keep = _random_keep(analysis)
    other = {k: v.copy() for k, v in keep.items()}
    name = analysis.groups[0].name
    i = int(np.flatnonzero(other[name])[0])
    other[name][i] = False
    j = int(np.flatnonzero(~keep[name])[0])
    other[name][j] = True
    x = _input(model)
    rel = _rel(_outputs(cut_channels(model, analysis, keep), x), _outputs(mask_channels(model, analysis, other), x))
    assert rel > 100 * TOL


def test_keep_all_is_the_same_model(exported):
    model = exported("mobilenet_v3_small_dynamo")
    analysis = analyze_channels(model)
    keep = {g.name: np.ones(g.size, dtype=bool) for g in analysis.groups}
    cut, rel = _check_cut(model, analysis, keep)
    assert rel == 0.0
    assert _n_params(cut) == _n_params(model)
    assert [numpy_helper.to_array(t).tobytes() for t in cut.graph.initializer] == \
           [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]
    assert analyze_channels(model) == analysis  # deterministic


def test_keep_is_checked(exported):
    model = exported("squeezenet1_0")
    analysis = analyze_channels(model)
    keep = _random_keep(analysis)
    name, size = analysis.groups[0].name, analysis.groups[0].size
    with pytest.raises(ValueError, match="keeps none"):
        cut_channels(model, analysis, {**keep, name: np.zeros(size, dtype=bool)})
    with pytest.raises(ValueError, match="shape"):
        mask_channels(model, analysis, {**keep, name: np.ones(size + 1, dtype=bool)})
    with pytest.raises(ValueError, match="does not have"):
        cut_channels(model, analysis, {**keep, "no such group": np.ones(3, dtype=bool)})
    resnet = exported("resnet18")
    with pytest.raises(ValueError, match="not a group of this model"):
        cut_channels(resnet, analysis, keep)


# --- hand-built graphs ----------------------------------------------------------------------------------------
def _model(nodes, inits: dict[str, np.ndarray], in_shape=(3, 8, 8), opset: int = 17, domains=()) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", *in_shape])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                           for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)] + [oh.make_opsetid(d, 1) for d in domains])
    model.ir_version = 10
    return model


def _w(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).normal(0, 0.3, shape)


def _head(src: str) -> list[onnx.NodeProto]:
    return [oh.make_node("GlobalAveragePool", [src], ["gap"]), oh.make_node("Flatten", ["gap"], ["flat"]),
            oh.make_node("Gemm", ["flat", "fc", "fc_b"], ["y"], transB=1)]


def test_unknown_operator_blocks_its_channels():
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("LRN", ["c1"], ["n1"], name="lrn", size=3),
             oh.make_node("Conv", ["n1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c2"], ["r2"], name="relu2"), *_head("r2")]
    inits = {"w1": _w(8, 3, 3, 3), "b1": _w(8), "w2": _w(12, 8, 3, 3), "b2": _w(12), "fc": _w(10, 12), "fc_b": _w(10)}
    model = _model(nodes, inits)
    analysis = analyze_channels(model)
    lrn = [b for b in analysis.blocked if b.node == "lrn"]
    assert lrn and lrn[0].op_type == "LRN" and "not understood" in lrn[0].reason
    assert [g.producers for g in analysis.groups] == [("conv2",)]  # conv1's channels flow into the LRN
    keep = _random_keep(analysis)
    cut, rel = _check_cut(model, analysis, keep)
    assert rel < TOL
    assert {t.name: tuple(t.dims) for t in cut.graph.initializer}["w1"] == (8, 3, 3, 3)

    # an operator of another domain: blocked with its node name, never guessed
    custom = _model([n if n.name != "lrn" else oh.make_node("Mystery", ["c1"], ["n1"], name="mystery",
                                                           domain="com.example") for n in nodes], inits,
                    domains=("com.example",))
    blocked = analyze_channels(custom).blocked
    assert any(b.node == "mystery" and "com.example" in b.reason for b in blocked)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape", "Constant"])
def test_flatten_into_gemm_cuts_blocks_of_rows(flatten):
    """Channels flattened with their 4x4 map feed the Gemm as blocks of 16 rows; a Reshape target that spells
    out 6*16 is rewritten, on a copy when another Reshape (of the input, never cut) uses it too."""
    to_flat = (oh.make_node("Flatten", ["p2"], ["flat"], name="flatten") if flatten == "Flatten"
               else oh.make_node("Reshape", ["p2", "shape"], ["flat"], name="reshape"))
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"]),
             oh.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             oh.make_node("BatchNormalization", ["c2", "s", "t", "m", "v"], ["n2"], name="bn2"),
             oh.make_node("Relu", ["n2"], ["p2"]), to_flat,
             oh.make_node("Gemm", ["flat", "fc1", "fc1_b"], ["h"], name="fc1", transB=1),
             oh.make_node("Relu", ["h"], ["hr"]),
             oh.make_node("Gemm", ["hr", "fc2", "fc2_b"], ["y"], name="fc2", transB=0)]
    inits = {"w1": _w(8, 3, 3, 3), "b1": _w(8), "w2": _w(6, 8, 3, 3), "b2": _w(6), "s": 1 + _w(6), "t": _w(6),
             "m": _w(6), "v": np.random.default_rng(0).uniform(0.5, 1.5, 6), "fc1": _w(20, 96), "fc1_b": _w(20),
             "fc2": _w(20, 10), "fc2_b": _w(10)}
    if flatten == "Reshape":
        inits["shape"] = np.array([-1, 6 * 16], dtype=np.int64)
        nodes.append(oh.make_node("Reshape", ["x", "shape"], ["x_rows"], name="other"))  # 192 -> 2 rows of 96
    elif flatten == "Constant":  # the target in a Constant node (integer constants stay nodes after normalize)
        nodes.insert(0, oh.make_node("Constant", [], ["shape"], name="target",
                                     value=numpy_helper.from_array(np.array([0, 96], dtype=np.int64))))
    model = _model(nodes, inits)
    if flatten == "Reshape":
        model.graph.output.append(oh.make_tensor_value_info("x_rows", onnx.TensorProto.FLOAT, ["M", 96]))
    analysis = analyze_channels(model)
    conv2 = next(g for g in analysis.groups if g.producers == ("conv2",))
    fc1 = next(s for s in conv2.slices if s.initializer == "fc1")
    assert (fc1.axis, fc1.offset, fc1.block) == (1, 0, 16)
    assert {(s.initializer, s.kind) for s in conv2.slices} >= {("s", "param"), ("t", "param"), ("m", "stat"),
                                                               ("v", "stat"), ("b2", "param")}
    hidden = next(g for g in analysis.groups if g.producers == ("fc1",))
    assert {(s.initializer, s.axis) for s in hidden.slices} == {("fc1", 0), ("fc1_b", 0), ("fc2", 0)}
    keep = _random_keep(analysis, seed=3)
    cut, rel = _check_cut(model, analysis, keep)
    assert rel < TOL
    after = {t.name: t for t in cut.graph.initializer}
    assert tuple(after["fc1"].dims) == (int(keep[hidden.name].sum()), 16 * int(keep[conv2.name].sum()))
    if flatten == "Reshape":
        target = next(n for n in cut.graph.node if n.name == "reshape").input[1]
        assert numpy_helper.to_array(after[target]).tolist() == [-1, 16 * int(keep[conv2.name].sum())]
        assert target != "shape" and numpy_helper.to_array(after["shape"]).tolist() == [-1, 96]
    if flatten == "Constant":
        target = next(n for n in cut.graph.node if n.name == "reshape").input[1]
        constant = next(n for n in cut.graph.node if n.name == "target")  # rewritten in place: it feeds only this
        assert target == "shape" and numpy_helper.to_array(constant.attribute[0].t).tolist() == [
            0, 16 * int(keep[conv2.name].sum())]


def test_view_with_runtime_batch_into_linear(tmp_path):
    """`x.view(x.size(0), -1)` as users write it: the Reshape target is built at run time from the batch size
    and a constant -1, so the flattened channels (blocks of 4x4 rows) can still be cut."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1, stride=2)
            self.bn = nn.BatchNorm2d(6)
            self.fc1, self.fc2 = nn.Linear(96, 20), nn.Linear(20, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
            return self.fc2(torch.relu(self.fc1(x.view(x.size(0), -1))))

    torch.manual_seed(0)
    path = tmp_path / "view.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    normalize(model)
    model = _perturb(model)
    assert any(n.op_type == "Shape" for n in model.graph.node)  # the target really is computed at run time
    analysis = analyze_channels(model)
    assert len(analysis.blocked) == 2, analysis.describe()
    conv2 = next(g for g in analysis.groups if g.producers[0].endswith("conv2/Conv"))
    assert ("fc1.weight", 1, 16) in {(s.initializer, s.axis, s.block) for s in conv2.slices}
    assert _check_cut(model, analysis, _random_keep(analysis, seed=2))[1] < TOL


def test_tied_weight_ties_its_channels():
    """One weight used by two convolutions: what one cuts from it, the other must too."""
    nodes = [oh.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c0"], ["r0"]),
             oh.make_node("Conv", ["r0", "w"], ["c1"], name="tied1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"]),
             oh.make_node("Conv", ["r1", "w"], ["c2"], name="tied2", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c2"], ["r2"]), *_head("r2")]
    model = _model(nodes, {"w0": _w(8, 3, 3, 3), "w": _w(8, 8, 3, 3), "fc": _w(10, 8), "fc_b": _w(10)})
    analysis = analyze_channels(model)
    assert [g.producers for g in analysis.groups] == [("stem", "tied1", "tied2")]
    cut, rel = _check_cut(model, analysis, _random_keep(analysis, seed=1))
    assert rel < TOL


def test_residual_of_concat_and_single_tensor_splits_the_single_tensor():
    """Adding a Concat of two groups to one conv's output splits the conv's channels into two runs of the same
    channels (as a grouped Conv's input): channel j of `a`, of `b`, and channels j and j+4 of `c` go together."""
    nodes = [oh.make_node("Conv", ["x", "wa"], ["a"], name="a"), oh.make_node("Conv", ["x", "wb"], ["b"], name="b"),
             oh.make_node("Concat", ["a", "b"], ["ab"], name="cat", axis=1),
             oh.make_node("Conv", ["x", "wc"], ["c"], name="c"), oh.make_node("Add", ["ab", "c"], ["s"], name="add"),
             oh.make_node("Conv", ["s", "wd"], ["d"], name="d"), oh.make_node("Relu", ["d"], ["r"]), *_head("r")]
    model = _model(nodes, {"wa": _w(4, 3, 1, 1), "wb": _w(4, 3, 1, 1), "wc": _w(8, 3, 1, 1), "wd": _w(6, 8, 1, 1),
                           "fc": _w(10, 6), "fc_b": _w(10)})
    analysis = analyze_channels(model)
    assert [(g.producers, g.size) for g in analysis.groups] == [(("a", "b", "c"), 4), (("d",), 6)]
    rows = sorted((s.initializer, s.offset) for s in analysis.groups[0].slices if s.axis == 0)
    assert rows == [("wa", 0), ("wb", 0), ("wc", 0), ("wc", 4)]
    assert not any(b.node == "add" for b in analysis.blocked)
    keep = _random_keep(analysis)
    cut, rel = _check_cut(model, analysis, keep)
    assert rel < TOL
    assert next(t for t in cut.graph.initializer if t.name == "wc").dims[0] == 2 * keep[analysis.groups[0].name].sum()


def test_a_layer_norm_over_the_channels_is_sliced_and_normalises_the_kept_ones():
    """ConvNeXt/MetaFormer's channels-last LayerNorm: its scale and bias go with the channels; cut, it normalises
    over the kept channels, and the masked reference (Gather around it) computes the same."""
    nodes = [oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             oh.make_node("Transpose", ["c0"], ["t0"], perm=[0, 2, 3, 1]),
             oh.make_node("LayerNormalization", ["t0", "ln_s", "ln_b"], ["n0"], name="ln", axis=-1),
             oh.make_node("Transpose", ["n0"], ["t1"], perm=[0, 3, 1, 2]),
             oh.make_node("Conv", ["t1", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"]), *_head("r1")]
    model = _model(nodes, {"w0": _w(16, 3, 3, 3), "b0": _w(16), "ln_s": 1 + _w(16, seed=1), "ln_b": _w(16, seed=2),
                           "w1": _w(8, 16, 3, 3), "fc": _w(10, 8), "fc_b": _w(10)})
    analysis = analyze_channels(model)
    stem = next(g for g in analysis.groups if g.producers == ("stem",))
    assert {("ln_s", "param"), ("ln_b", "param")} <= {(s.initializer, s.kind) for s in stem.slices}
    assert [(n.node, n.axis) for n in analysis.norms] == [("ln", 3)]
    assert not any(b.node == "ln" for b in analysis.blocked)
    keep = _random_keep(analysis, seed=2)
    assert not keep[stem.name].all()
    cut, rel = _check_cut(model, analysis, keep)
    assert rel < TOL
    # zeroing alone would not do: the pruned channels' zeros would enter the norm's mean and variance
    zeroed = mask_channels(model, analysis.__class__(analysis.groups, analysis.blocked), keep)
    assert _rel(_outputs(zeroed, _input(model)), _outputs(cut, _input(model))) > 1e-3
