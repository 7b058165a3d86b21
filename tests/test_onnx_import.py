"""Import: clear errors for broken files, the IR-version fact, the normalisation passes, converters for
newer opsets, and the ParamMap (transforms, ties, trainable BatchNorm, determinism)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx_corpus import IR_VERSION, build

from pipeline.errors import InvalidModelError, UnsupportedOperatorError
from stages.import_onnx import import_onnx
from stages.onnx_convert import runtime
from stages.onnx_convert.sparsity import file_sparsity
from stages.onnx_convert.to_torch import load_module, to_torch


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_import_corpus")


def _model(nodes, inits, in_shape, out_shape, opset=17, ir_version=IR_VERSION, out_type=onnx.TensorProto.FLOAT):
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)],
                          [oh.make_tensor_value_info("y", out_type, out_shape)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def _save(model, path):
    onnx.save(model, str(path))
    return path


# --- broken files: one clear error, nothing written ---------------------------------------------------
def test_broken_files_give_invalid_model_error_and_write_nothing(tmp_path, corpus_dir):
    good = build("mlp_matmul_add", corpus_dir).read_bytes()
    cases = {
        "missing.onnx": None,
        "empty.onnx": b"",
        "truncated.onnx": good[: len(good) // 2],
        "text.onnx": b"this is not a model\n",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out_{name}"
        with pytest.raises(InvalidModelError):
            import_onnx(tmp_path / name, out)
        assert not out.exists() or not any(out.iterdir())


def test_checker_failure_is_invalid_model_error(tmp_path):
    bad = _model([oh.make_node("Relu", ["undefined"], ["y"])], {}, ["N", 4], ["N", 4])
    with pytest.raises(InvalidModelError, match="onnx.checker"):
        import_onnx(_save(bad, tmp_path / "bad.onnx"), tmp_path / "out")
    assert not (tmp_path / "out" / "normalized.onnx").exists()


def test_ir_version_fact_onnx_writes_newer_than_onnxruntime_reads(tmp_path):
    """onnx 1.23 writes IR 14 by default and onnxruntime 1.31 reads at most 13: models built with
    onnx.helper must set ir_version; import says so clearly instead of failing deep inside."""
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    default = _model([oh.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}, ["N", 4], ["N", 3], ir_version=None)
    assert default.ir_version > 13
    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(default.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(InvalidModelError, match="IR version"):
        import_onnx(_save(default, tmp_path / "ir14.onnx"), tmp_path / "out")
    default.ir_version = IR_VERSION
    ort.InferenceSession(default.SerializeToString(), providers=["CPUExecutionProvider"])
    assert import_onnx(_save(default, tmp_path / "ir10.onnx"), tmp_path / "out").ir_version == IR_VERSION


def test_unsupported_operator_names_op_domain_version_and_node(tmp_path):
    m = _model([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Hardmax", ["h"], ["y"], name="hm", axis=1)],
               {"w": np.ones((4, 3), np.float32)}, ["N", 4], ["N", 3], opset=13)
    with pytest.raises(UnsupportedOperatorError, match=r"Hardmax v13 in domain '' at node 'hm'"):
        import_onnx(_save(m, tmp_path / "hm.onnx"), tmp_path / "out")


# --- newer opsets: converters registered for versions onnx2torch lacks ---------------------------------
def _i64(*v):
    return np.asarray(v, dtype=np.int64)


OPSET_CASES = {
    "ReduceMean-18": ([oh.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], {"axes": _i64(2, 3)}, ["N", 4]),
    "ReduceMax-20": ([oh.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=1)], {"axes": _i64(1)},
                     ["N", 1, 6, 6]),
    "Identity-21": ([oh.make_node("Identity", ["x"], ["y"])], {}, ["N", 4, 6, 6]),
    "Reshape-21": ([oh.make_node("Reshape", ["x", "s"], ["y"])], {"s": _i64(0, -1)}, ["N", 144]),
    "Flatten-21": ([oh.make_node("Flatten", ["x"], ["y"], axis=1)], {}, ["N", 144]),
    "Transpose-21": ([oh.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {}, ["N", 6, 6, 4]),
    "Unsqueeze-21": ([oh.make_node("Unsqueeze", ["x", "a"], ["y"])], {"a": _i64(1)}, ["N", 1, 4, 6, 6]),
    "Shape+Cast-21": ([oh.make_node("Shape", ["x"], ["s"]), oh.make_node("Cast", ["s"], ["c"], to=1),
                       oh.make_node("Mul", ["x", "c0"], ["m"]), oh.make_node("ReduceSum", ["c", "k"], ["r"]),
                       oh.make_node("Add", ["m", "r"], ["y"])],
                      {"c0": np.float32(2.0), "k": _i64(0)}, ["N", 4, 6, 6]),
    "Pad-21": ([oh.make_node("Pad", ["x", "p"], ["y"], mode="constant")], {"p": _i64(0, 0, 1, 1, 0, 0, 1, 1)},
               ["N", 4, 8, 8]),
    "Split-18": ([oh.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
                  oh.make_node("Sub", ["a", "b"], ["y"])], {}, ["N", 2, 6, 6]),
    "Gelu-20": ([oh.make_node("Gelu", ["x"], ["y"])], {}, ["N", 4, 6, 6]),
    "CastLike-21": ([oh.make_node("CastLike", ["x", "like"], ["y"])], {"like": np.zeros(1, np.float32)},
                    ["N", 4, 6, 6]),
    "Resize-19": ([oh.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest", nearest_mode="floor",
                                coordinate_transformation_mode="asymmetric")],
                  {"sc": np.asarray([1, 1, 2, 2], np.float32)}, ["N", 4, 12, 12]),
    "AveragePool-19": ([oh.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], {},
                       ["N", 4, 3, 3]),
    "Size-21": ([oh.make_node("Size", ["x"], ["s"]), oh.make_node("Cast", ["s"], ["c"], to=1),
                 oh.make_node("Div", ["x", "c"], ["y"])], {}, ["N", 4, 6, 6]),
    "OneHot-11": ([oh.make_node("OneHot", ["i", "d", "v"], ["h"], axis=1), oh.make_node("Mul", ["x", "h"], ["y"])],
                  {"i": np.asarray([[0, -1, 2, 5, 7, -7]] * 4, np.int64), "d": _i64(6),
                   "v": np.asarray([0.5, 2.0], np.float32)}, ["N", 4, 6, 6]),  # -1 the last class; 7, -7: all off
}


@pytest.mark.parametrize("case", list(OPSET_CASES))
def test_operator_versions_newer_than_onnx2torch_convert_and_match_onnxruntime(case):
    nodes, inits, out_shape = OPSET_CASES[case]
    opset = int(case.rsplit("-", 1)[1])
    model = _model(nodes, inits, ["N", 4, 6, 6], out_shape, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    module, _ = to_torch(model)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    y_ort = runtime.run(runtime.session(model.SerializeToString()), x.numpy())
    with torch.no_grad():
        y = module.eval()(x)
    np.testing.assert_allclose(y.numpy(), y_ort, rtol=1e-5, atol=1e-5)


# --- normalisation and the ParamMap -------------------------------------------------------------------
def test_gemm_transforms_are_recorded_and_undone(tmp_path, corpus_dir):
    r = import_onnx(build("mlp_gemm_transb0_alpha", corpus_dir), tmp_path)
    module, pm = load_module(r.normalized_path)
    model = onnx.load(str(r.normalized_path))
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    name = pm.to_param("w1")
    entry = pm.entries[name]
    assert entry.transpose and entry.scale == 0.5 and entry.prunable
    torch_w = module.get_parameter(name).detach()
    assert torch_w.shape == (32, 16)  # nn.Linear layout
    np.testing.assert_allclose(pm.tensor_to_onnx(name, torch_w), w1, rtol=1e-6)
    np.testing.assert_allclose(pm.tensor_from_onnx(name, w1).numpy(), torch_w.numpy(), rtol=1e-6)
    mask = np.random.default_rng(0).random(w1.shape) > 0.5
    back_name, torch_mask = pm.mask_from_onnx("w1", mask)
    assert back_name == name and torch_mask.shape == torch_w.shape
    np.testing.assert_array_equal(pm.mask_to_onnx(name, torch_mask), mask)


def test_matmul_weights_become_trainable_prunable_parameters(tmp_path, corpus_dir):
    r = import_onnx(build("mlp_matmul_add", corpus_dir), tmp_path)
    module, pm = load_module(r.normalized_path)
    assert sorted(pm.prunable_initializers) == ["w1", "w2"]
    params = dict(module.named_parameters())
    assert all(params[n].requires_grad for n in pm.prunable)
    assert {pm.to_initializer(n) for n in params} == {"w1", "b1", "w2", "b2"}  # MatMul+Add biases train too
    module(torch.randn(3, 16)).sum().backward()
    assert all(params[n].grad is not None for n in pm.prunable)


def test_tied_weight_stays_one_parameter_one_mask_one_initializer(tmp_path, corpus_dir):
    r = import_onnx(build("tied_matmul", corpus_dir), tmp_path)
    module, pm = load_module(r.normalized_path)
    assert pm.prunable_initializers.count("w") == 1
    model = onnx.load(str(r.normalized_path))
    assert [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:2] == ["w", "w"]
    assert any("tied" in c and "w" in c for c in r.changes)


def test_shared_bias_is_unshared(tmp_path, corpus_dir):
    r = import_onnx(build("shared_bias_gemm", corpus_dir), tmp_path)
    model = onnx.load(str(r.normalized_path))
    biases = [n.input[2] for n in model.graph.node if n.op_type == "Gemm"]
    assert len(set(biases)) == 2 and any("un-shared" in c for c in r.changes)
    _, pm = load_module(r.normalized_path)
    assert pm.to_param(biases[0]) != pm.to_param(biases[1])


def test_batchnorm_trains_and_updates_running_statistics(tmp_path, corpus_dir):
    r = import_onnx(build("depthwise_ts13", corpus_dir), tmp_path)
    module, pm = load_module(r.normalized_path)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(b.weight, torch.nn.Parameter) and b.weight.requires_grad for b in bns)
    assert module.training  # convert() returns train mode; so do we
    before = bns[0].running_mean.clone()
    module(torch.randn(4, *r.input_shape))
    assert not torch.equal(before, bns[0].running_mean)
    names = {pm.to_initializer(n) for n, b in module.named_buffers() if n in pm.entries}
    assert len(names) == 2 * len(bns)  # each BN owns its running statistics


def test_load_module_is_deterministic_and_leaves_the_rng_alone(tmp_path, corpus_dir):
    r = import_onnx(build("depthwise_ts13", corpus_dir), tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, pm_a = load_module(r.normalized_path)
    assert torch.equal(torch.rand(1), expected)
    b, pm_b = load_module(r.normalized_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert pm_a.entries == pm_b.entries and pm_a.prunable == pm_b.prunable


def test_constant_weights_and_fixed_batch_are_normalised(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 10)).astype(np.float32)
    nodes = [oh.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             oh.make_node("ConstantOfShape", ["shape"], ["b"], value=numpy_helper.from_array(np.ones(1, np.float32))),
             oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Add", ["h", "b"], ["z"]),
             oh.make_node("Reshape", ["z", "target"], ["y"])]
    m = _model(nodes, {"shape": _i64(10), "target": _i64(1, 10)}, [1, 16], [1, 10])
    r = import_onnx(_save(m, tmp_path / "const.onnx"), tmp_path / "out")
    assert any("folded 2" in c for c in r.changes) and any("Reshape" in c for c in r.changes)
    model = onnx.load(str(r.normalized_path))
    assert {"w", "b"} <= {t.name for t in model.graph.initializer}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    _, pm = load_module(r.normalized_path)
    assert pm.prunable_initializers == ["w"]


def test_initializers_listed_as_inputs_are_not_real_inputs(tmp_path, corpus_dir):
    model = onnx.load(str(build("mlp_matmul_add", corpus_dir)))
    for t in model.graph.initializer:
        model.graph.input.append(oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    r = import_onnx(_save(model, tmp_path / "inputs.onnx"), tmp_path / "out")
    assert r.input_name == "x" and any("removed 4 initializers from the graph inputs" in c for c in r.changes)
    assert [i.name for i in onnx.load(str(r.normalized_path)).graph.input] == ["x"]


def test_batchnorm_scale_merged_with_running_var_is_separated(tmp_path):
    # The TorchScript exporter de-duplicates equal constants across slots of one node: at
    # initialization a BatchNorm's scale (ones) and running_var (ones) become one initializer, and
    # so do its bias and running_mean (zeros). Left merged, scale and bias are buffers and never train.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    src = tmp_path / "bn.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(src), dynamo=False, opset_version=18,
                      do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    bn = next(n for n in onnx.load(str(src)).graph.node if n.op_type == "BatchNormalization")
    result = import_onnx(src, tmp_path / "out")
    bn = next(n for n in onnx.load(str(result.normalized_path)).graph.node if n.op_type == "BatchNormalization")
    assert len(set(bn.input[1:])) == 4, list(bn.input)
    module, _ = load_module(result.normalized_path)
    trainable = {n for n, _ in module.named_parameters()}
    assert sum(n.endswith(("BatchNormalization.weight", "BatchNormalization.bias")) for n in trainable) == 2, trainable


def test_zero_initialised_residual_weights_stored_once_by_the_exporter_are_untied(tmp_path):
    # zero_init_residual: each block's last BatchNorm scale is 0, so in eval mode the exporter folds it into an
    # all-zero conv weight and stores the equal tensors once: four "ties" the user's network does not have.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).eval()
    src = tmp_path / "zi.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(src), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "N"}})
    result = import_onnx(src, tmp_path / "out")
    assert any(c.startswith("untied 4 weights shared only because the exporter") for c in result.changes)
    assert not any(c.startswith("kept") for c in result.changes), result.changes
    convs = [n for n in onnx.load(str(result.normalized_path)).graph.node if n.op_type == "Conv"]
    assert len({n.input[1] for n in convs}) == len(convs) == 20  # every convolution its own weight and bias
    assert len({n.input[2] for n in convs}) == 20
    module, _ = load_module(result.normalized_path)
    assert sum(p.dim() == 4 for p in module.parameters()) == 20


def test_layernorm_after_reshapes_around_a_dynamic_batch_takes_its_shape_from_the_scale(tmp_path):
    # mobilevit folds the batch into its patch axis: shape inference then knows no axis of the LayerNormalization's
    # input, and onnx2torch built nn.LayerNorm(normalized_shape=[0])
    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ln, self.fc = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.LayerNorm(8), \
                torch.nn.Linear(8, 10)

        def forward(self, x):
            h = self.conv(x)
            b, c, hh, ww = h.shape
            t = self.ln(h.reshape(b * 4, c, hh * ww // 4).transpose(1, 2))
            return self.fc(t.mean(1).reshape(b, 4, c).mean(1))

    torch.manual_seed(0)
    src = tmp_path / "patches.onnx"
    torch.onnx.export(Patches().eval(), (torch.zeros(1, 1, 8, 8),), str(src), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "N"}})
    result = import_onnx(src, tmp_path / "out")  # runs the module on a batch of 2 and checks parity
    assert result.parity_max_rel < 1e-4
    module, _ = load_module(result.normalized_path)
    assert [tuple(m.normalized_shape) for m in module.modules() if isinstance(m, torch.nn.LayerNorm)] == [(8,)]


def test_a_parameter_the_converter_makes_up_stays_fixed_so_the_trained_file_matches_torch(tmp_path):
    # dynamo writes a LayerNormalization without B (MetaFormer's norms have no bias); onnx2torch gives it a zero bias
    # that the file has no initializer for: trained, torch and the exported file would disagree (0.19 relative)
    from stages.export_onnx import export_onnx

    class NoBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ln, self.fc = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.LayerNorm(8, bias=False), \
                torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.ln(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    torch.manual_seed(0)
    src = tmp_path / "nobias.onnx"
    torch.onnx.export(NoBias().eval(), (torch.zeros(2, 1, 8, 8),), str(src), dynamo=True, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    assert [len(n.input) for n in onnx.load(str(src)).graph.node if n.op_type == "LayerNormalization"] == [2]
    result = import_onnx(src, tmp_path / "out")
    module, pm = load_module(result.normalized_path)
    made_up = dict(module.named_parameters())
    assert pm.unmapped and all(not made_up[k].requires_grad for k in pm.unmapped if k in made_up)

    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), torch.arange(16) % 10).backward()
        opt.step()
    torch.save(module.state_dict(), tmp_path / "trained.pt")
    export_onnx(result.normalized_path, tmp_path / "trained.pt", tmp_path / "trained.onnx")
    with torch.no_grad():
        want = module.eval()(x).numpy()
    got = runtime.run(runtime.session(tmp_path / "trained.onnx"), x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# --- pools with asymmetric pads: onnxruntime is the reference ----------------------------------------------------
POOL_CASES = {
    "avg-pads-end-cip0": ("AveragePool", 11, (9, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])),
    "avg-pads-begin-cip1-ceil": ("AveragePool", 11, (9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1],
                                                                 count_include_pad=1, ceil_mode=1)),
    "avg-pads-cip0-ceil": ("AveragePool", 19, (8, 9), dict(kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 1, 2],
                                                           ceil_mode=1)),
    "avg-same-upper-cip1": ("AveragePool", 11, (7, 8), dict(kernel_shape=[3, 3], strides=[2, 2],
                                                            auto_pad="SAME_UPPER", count_include_pad=1)),
    "avg-same-lower-cip0": ("AveragePool", 10, (7, 8), dict(kernel_shape=[2, 2], strides=[2, 2],
                                                            auto_pad="SAME_LOWER")),
    "avg-1d-cip1": ("AveragePool", 11, (7,), dict(kernel_shape=[3], strides=[2], pads=[2, 1], count_include_pad=1)),
    "avg-3d-ceil": ("AveragePool", 11, (5, 6, 4), dict(kernel_shape=[2, 2, 2], strides=[2, 2, 2],
                                                       pads=[0, 1, 0, 1, 0, 1], ceil_mode=1)),
    "avg-v7-inception": ("AveragePool", 7, (6, 6), dict(kernel_shape=[7, 7], strides=[1, 1], pads=[0, 0, 1, 1])),
    "max-pads-end-ceil": ("MaxPool", 12, (8, 8), dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1],
                                                      ceil_mode=1)),
    "max-same-upper-dilated": ("MaxPool", 12, (9, 10), dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2],
                                                            auto_pad="SAME_UPPER")),
    "max-1d": ("MaxPool", 8, (7,), dict(kernel_shape=[3], strides=[2], pads=[2, 0])),
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pools_with_asymmetric_pads_match_onnxruntime(case):
    op, opset, size, attrs = POOL_CASES[case]
    out_shape = ["N", 3, *(f"d{i}" for i in range(len(size)))]
    model = _model([oh.make_node(op, ["x"], ["y"], **attrs)], {}, ["N", 3, *size], out_shape, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    module, _ = to_torch(model)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    y_ort = runtime.run(runtime.session(model.SerializeToString()), x.numpy())
    with torch.no_grad():
        y = module.eval()(x)
    assert y.shape == y_ort.shape
    np.testing.assert_allclose(y.numpy(), y_ort, rtol=1e-5, atol=1e-6)


SAME_CONVS = {  # (input H, W, kernel, strides, dilations, auto_pad, groups)
    "same-upper-even-kernel": ((8, 8), [4, 4], [1, 1], [1, 1], "SAME_UPPER", 1),
    "same-lower-stride-2": ((9, 10), [3, 3], [2, 2], [1, 1], "SAME_LOWER", 1),
    "same-upper-stride-2-dilated": ((9, 10), [3, 2], [2, 2], [2, 1], "SAME_UPPER", 1),
    "same-upper-depthwise-9": ((12, 12), [9, 9], [1, 1], [1, 1], "SAME_UPPER", 4),  # timm's convmixer
}


@pytest.mark.parametrize("case", list(SAME_CONVS))
def test_conv_with_same_auto_pad_imports_with_explicit_pads_matching_onnxruntime(case, tmp_path):
    (h, w), kernel, strides, dilations, auto_pad, groups = SAME_CONVS[case]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4 // groups, *kernel)).astype(np.float32)
    head = rng.standard_normal((10, 4)).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], kernel_shape=kernel, strides=strides, dilations=dilations,
                          auto_pad=auto_pad, group=groups),
             oh.make_node("GlobalAveragePool", ["c"], ["p"]), oh.make_node("Flatten", ["p"], ["f"]),
             oh.make_node("Gemm", ["f", "head"], ["y"], transB=1)]
    model = _model(nodes, {"w": weight, "head": head}, ["N", 4, h, w], ["N", 10])
    src = _save(model, tmp_path / "same.onnx")
    result = import_onnx(src, tmp_path / "out")  # runs the module on a batch of 2 against onnxruntime
    assert result.parity_max_rel < 1e-4
    assert any("auto_pad of 1 Conv node(s) as explicit pads" in c for c in result.changes)
    conv = next(n for n in onnx.load(result.normalized_path).graph.node if n.op_type == "Conv")
    assert not any(a.name == "auto_pad" for a in conv.attribute)


def test_an_absent_optional_input_written_as_empty_is_dropped(tmp_path):
    # timm's edgenext normalises with clamp_min: Clip(x, min, "") and onnx2torch looked "" up as a tensor
    nodes = [oh.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
             oh.make_node("Clip", ["x", "lo", ""], ["c"]), oh.make_node("Flatten", ["c"], ["f"]),
             oh.make_node("Gemm", ["f", "head"], ["y"], transB=1)]
    head = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    src = _save(_model(nodes, {"head": head}, ["N", 1, 4, 4], ["N", 10]), tmp_path / "clip.onnx")
    result = import_onnx(src, tmp_path / "out")
    assert result.parity_max_rel < 1e-5
    assert "dropped the empty trailing (absent optional) inputs of 1 node(s)" in result.changes


def test_a_clip_with_only_a_maximum_gets_minus_infinity_as_its_minimum(tmp_path):
    # swinv2 clamps its logit scale from above only: Clip(x, "", max)
    nodes = [oh.make_node("Clip", ["x", "", "hi"], ["c"]), oh.make_node("Flatten", ["c"], ["f"]),
             oh.make_node("Gemm", ["f", "head"], ["y"], transB=1)]
    head = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    src = _save(_model(nodes, {"head": head, "hi": np.array(0.25, np.float32)}, ["N", 1, 4, 4], ["N", 10]),
                tmp_path / "clip.onnx")
    result = import_onnx(src, tmp_path / "out")
    assert result.parity_max_rel < 1e-5
    assert "gave 1 Clip node(s) with only a maximum the minimum -inf" in result.changes


# --- a fixed batch: only what provably is the batch is rewritten --------------------------------------------------
def test_fixed_batch_rewrites_the_batch_and_leaves_other_leading_ones(tmp_path):
    """`t_data` reshapes the data (batch-major): its leading 1 is the batch. `t_const` reshapes a constant with the
    same target: its leading 1 is not, and stays."""
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Reshape", ["h", "t_data"], ["r"], name="data"),
             oh.make_node("Reshape", ["c", "t_const"], ["k"], name="const"), oh.make_node("Add", ["r", "k"], ["s"]),
             oh.make_node("Reshape", ["s", "t_out"], ["y"], name="out")]
    inits = {"w": rng.normal(size=(16, 8)).astype(np.float32), "c": rng.normal(size=8).astype(np.float32),
             "t_data": _i64(1, 2, 4), "t_const": _i64(1, 2, 4), "t_out": _i64(1, 8)}
    r = import_onnx(_save(_model(nodes, inits, [1, 16], [1, 8]), tmp_path / "fixed.onnx"), tmp_path / "out")
    assert any("2 Reshape targets: data, out" in c for c in r.changes), r.changes
    targets = {t.name: numpy_helper.to_array(t).tolist() for t in onnx.load(str(r.normalized_path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT64}
    assert targets == {"t_data": [0, 2, 4], "t_const": [1, 2, 4], "t_out": [0, 8]}


def test_fixed_batch_allowzero_target_with_a_minus_one_reads_the_batch_at_run_time(tmp_path):
    """The dynamo exporter writes allowzero=1 on every Reshape: `view(1, -1, 4)` at batch 1 can take neither 0 nor
    a second -1, so the batch size is read from the input (Shape -> Gather -> Concat)."""
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]),
             oh.make_node("Reshape", ["h", "t1"], ["r"], name="split_heads", allowzero=1),
             oh.make_node("Relu", ["r"], ["a"]), oh.make_node("Reshape", ["a", "t2"], ["f"], name="merge", allowzero=1),
             oh.make_node("MatMul", ["f", "w2"], ["y"])]
    inits = {"w": rng.normal(size=(16, 8)).astype(np.float32), "w2": rng.normal(size=(8, 10)).astype(np.float32),
             "t1": _i64(1, -1, 4), "t2": _i64(1, 8)}
    r = import_onnx(_save(_model(nodes, inits, [1, 16], [1, 10]), tmp_path / "dynamo.onnx"), tmp_path / "out")
    assert any("1 Reshape targets read the batch size at run time" in c and "split_heads" in c for c in r.changes)
    assert any("1 Reshape targets: merge" in c for c in r.changes), r.changes
    model = onnx.load(str(r.normalized_path))
    assert [n.op_type for n in model.graph.node if n.name.startswith("batch/")] == ["Shape", "Gather", "Concat"]
    module, _ = load_module(r.normalized_path)
    x = torch.randn(5, 16)
    y_ort = runtime.run(runtime.session(r.normalized_path), x.numpy())
    np.testing.assert_allclose(module.eval()(x).detach().numpy(), y_ort, rtol=1e-5, atol=1e-5)


def test_fixed_batch_is_followed_through_a_target_read_with_shape_and_gather(tmp_path):
    """`view(x.size(0), -1)` as the TorchScript exporter writes it (Shape -> Gather -> Unsqueeze -> Concat) keeps the
    batch where it was; the literal batch of the Reshape after it is then known to be the batch and rewritten."""
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("Shape", ["x"], ["s"]), oh.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             oh.make_node("Unsqueeze", ["n", "axes"], ["n1"]), oh.make_node("Concat", ["n1", "minus1"], ["t"], axis=0),
             oh.make_node("Reshape", ["x", "t"], ["f"], name="flatten"), oh.make_node("MatMul", ["f", "w"], ["h"]),
             oh.make_node("Reshape", ["h", "t_out"], ["y"], name="out")]
    inits = {"zero": np.asarray(0, np.int64), "axes": _i64(0), "minus1": _i64(-1),
             "w": rng.normal(size=(16, 8)).astype(np.float32), "t_out": _i64(1, 2, 4)}
    r = import_onnx(_save(_model(nodes, inits, [1, 4, 2, 2], [1, 2, 4]), tmp_path / "ts.onnx"), tmp_path / "out")
    assert any("1 Reshape targets: out" in c for c in r.changes), r.changes


def test_a_constant_table_times_a_weight_keeps_the_table_fixed_and_prunes_only_the_weight(tmp_path):
    # swinv2's continuous position bias: a fixed coordinate table (a Constant) through a Linear, MatMul(table, W)
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((16, 2)).astype(np.float32))
    nodes = [oh.make_node("Constant", [], ["table"], value=table), oh.make_node("MatMul", ["table", "w_cpb"], ["t"]),
             oh.make_node("Flatten", ["x"], ["f"]), oh.make_node("MatMul", ["f", "t"], ["h"]),
             oh.make_node("Gemm", ["h", "head"], ["y"], transB=1)]
    inits = {"w_cpb": rng.standard_normal((2, 8)).astype(np.float32),
             "head": rng.standard_normal((10, 8)).astype(np.float32)}
    src = _save(_model(nodes, inits, ["N", 1, 4, 4], ["N", 10]), tmp_path / "cpb.onnx")
    result = import_onnx(src, tmp_path / "out")
    assert result.parity_max_rel < 1e-5
    module, pmap = load_module(result.normalized_path)
    assert sorted(pmap.prunable_initializers) == ["head", "w_cpb"]
    assert result.n_prunable == 2
    table_entry = next(e for e in pmap.entries.values() if e.initializer not in ("head", "w_cpb"))
    assert table_entry.kind == "buffer"  # a constant of the model: neither pruned nor trained
    assert sorted(layer.name for layer in file_sparsity(onnx.load(result.normalized_path)).layers) == ["head", "w_cpb"]
