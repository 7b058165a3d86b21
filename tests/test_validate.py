"""stages/validate: figures read from real ONNX files through a real onnxruntime session, and the gate."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
from onnx import numpy_helper

from pipeline.config import make_config
from stages.measure.report import ORT_DENSE_SPEED, load_report
from stages.onnx_convert.sparsity import file_sparsity
from stages.validate import validate


def _pruned(module, sparsity: float):
    """A copy of `module` with the smallest-magnitude fraction of its weight matrices (global) set to 0."""
    module = copy.deepcopy(module)
    weights = [p for n, p in module.named_parameters() if p.dim() > 1]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(round(sparsity * flat.numel()))
    threshold = flat.kthvalue(k).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).float())
    return module, flat.numel()


@pytest.fixture(scope="module")
def pruned_half(tiny_digits, to_onnx, tmp_path_factory):
    dense_path, module, splits = tiny_digits
    pruned, total = _pruned(module, 0.5)
    path = to_onnx(pruned, tmp_path_factory.mktemp("pruned") / "pruned.onnx")
    return dense_path, path, pruned, splits, total


def _validate(pruned_half, tmp_path, reference=None, **fields):
    dense_path, path, pruned, splits, _ = pruned_half
    config = make_config(model=dense_path, **{"sparsity": 0.5, "min_accuracy": 0.5, **fields})
    return validate(path, config, tmp_path, reference=reference or pruned, val=splits.val, latency_runs=5)


def test_report_reads_accuracy_sparsity_and_parity_from_the_exported_file(pruned_half, tmp_path):
    report = _validate(pruned_half, tmp_path)
    _, _, _, splits, total = pruned_half

    assert report.passed, report.failures
    assert report.provider == "CPUExecutionProvider"
    assert report.n_val == len(splits.val)
    assert 0.5 < report.top1 <= report.top5 <= 1.0  # well above chance (0.1) on held-out digits
    s = report.sparsity
    assert [l.op for l in s.layers] == ["Conv", "Conv", "Gemm"]
    assert s.prunable_total == total and s.prunable_zeros >= 0.5 * total - 1
    assert s.params_total == s.prunable_total + 8 + 8 + 10  # plus the three biases
    assert s.params_zeros >= s.prunable_zeros
    assert report.parity_max_rel < 1e-5
    assert report.latency_ms["input"]["p50"] > 0 and report.latency_ms["exported"]["p90"] > 0
    z = report.sizes
    assert z["input"] == z["exported"] == z["dense"]  # same graph, same dense storage
    assert z["dense_gzip"] < z["dense"]  # the zeros compress
    # a tensor is stored sparse only where that is smaller: above ~2/3 zeros (values + int64 indices)
    assert 0 < z["sparse_initializers"] <= z["dense"]

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passed"] is True and saved["sparsity"]["sparsity"] == pytest.approx(s.sparsity)
    assert load_report(tmp_path / "report.json") == report
    md = (tmp_path / "report.md").read_text()
    assert "Gate: PASSED" in md and ORT_DENSE_SPEED in md and "sparse initializers" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_gate_names_each_condition_and_by_how_much(pruned_half, tmp_path):
    report = _validate(pruned_half, tmp_path, sparsity=0.9, min_accuracy=0.999, baseline_accuracy=1.0, max_drop=0.0)

    assert not report.passed
    failed = {c.name for c in report.checks if not c.passed}
    assert failed == {"min_accuracy", "max_drop", "sparsity"}
    text = " | ".join(report.failures)
    assert "short by" in text and "over by" in text and "weights" in text
    assert "Gate: FAILED" in (tmp_path / "report.md").read_text()


def test_parity_check_catches_a_module_that_disagrees_with_the_file(pruned_half, tmp_path):
    _, _, pruned, _, _ = pruned_half
    other = copy.deepcopy(pruned)
    with torch.no_grad():
        other[-1].bias.add_(0.5)
    report = _validate(pruned_half, tmp_path, reference=other)

    assert [c.name for c in report.checks if not c.passed] == ["parity"]
    assert report.parity_max_abs == pytest.approx(0.5, rel=1e-3)


def test_prunable_weights_are_matmul_gemm_conv_operands_in_subgraphs_too():
    w = np.zeros((4, 3), np.float32)
    w[0] = 1.0  # 3 of 12 nonzero
    v = np.arange(6, dtype=np.float32).reshape(3, 2)  # one zero of 6
    bias = np.zeros(3, np.float32)  # a 1-D operand: a parameter, not a prunable weight
    then = oh.make_graph(
        [oh.make_node("MatMul", ["h", "V"], ["o1"])], "then", [],
        [oh.make_tensor_value_info("o1", onnx.TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(v, "V")])
    other = oh.make_graph(
        [oh.make_node("MatMul", ["h", "V"], ["o2"])], "else", [],
        [oh.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, [1, 2])])
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["m"]), oh.make_node("Add", ["m", "b"], ["h"]),
         oh.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
         oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "b")],
    )
    s = file_sparsity(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))

    assert [(l.name, l.op, l.numel, l.zeros) for l in s.layers] == [("W", "MatMul", 12, 9), ("V", "MatMul", 6, 1)]
    assert (s.params_total, s.params_zeros) == (12 + 6 + 3, 9 + 1 + 3)


def test_sparsity_of_a_file_with_sparse_initializers_equals_its_dense_form(pruned_half):
    from stages.onnx_convert.sparse_storage import to_sparse_initializers

    dense = onnx.load(pruned_half[1])
    for t in dense.graph.initializer:  # zero most of the Gemm weight so it is stored sparse
        if t.name.endswith("weight") and len(t.dims) == 2:
            a = numpy_helper.to_array(t).copy()
            a[:, 8:] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    sparse, chosen = to_sparse_initializers(dense)

    assert chosen and len(sparse.graph.sparse_initializer) == len(chosen)
    assert file_sparsity(sparse) == file_sparsity(dense)
