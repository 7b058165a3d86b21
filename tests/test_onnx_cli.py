"""The ONNX in/out commands run as a user runs them: the real `force-compress` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest


def fc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_cli")
    p = fc("export-model", "mobilenet_v3_small", "--out", d / "m.onnx", "--num-classes", 10, "--input-size", 32, 32)
    assert p.returncode == 0, p.stderr
    return d / "m.onnx"


def test_export_model_writes_a_torchvision_model_with_batchnorm_and_a_dynamic_batch(exported):
    model = onnx.load(str(exported))
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:] == [10]
    meta = {p.key: p.value for p in model.metadata_props}
    assert "torchscript" in meta["force_compress.exporter"] and "opset 18" in meta["force_compress.exporter"]


def _in_process(*args):
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_inspect_masks_apply_masks_inspect(exported, tmp_path):
    p = fc("inspect", exported, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["import"]["ok"] and info["sparsity"] == 0.0 and info["opsets"]["ai.onnx"] == 18
    assert info["layers"] and info["prunable_params"] == sum(layer["params"] for layer in info["layers"])

    # the rest in-process (click's runner): the subprocess above covers the real entry point
    p = _in_process("masks", exported, "--method", "random", "--sparsity", 0.9, "--out", tmp_path / "m.npz")
    assert p.exit_code == 0, p.output
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["method"] == "random" and side["target_density"] == pytest.approx(0.1)
    with np.load(tmp_path / "m.npz") as npz:  # keyed by ONNX initializer name, readable with numpy alone
        names = {t.name for t in onnx.load(str(exported)).graph.initializer}
        assert set(npz.files) <= names and npz[npz.files[0]].dtype == bool

    p = _in_process("apply-masks", exported, tmp_path / "m.npz", "--out", tmp_path / "sparse.onnx", "--storage",
                    "sparse")
    assert p.exit_code == 0, p.output
    p = _in_process("inspect", tmp_path / "sparse.onnx", "--json", "--no-import")
    info = json.loads(p.stdout)
    assert info["sparsity"] == pytest.approx(0.9, abs=1e-3) and info["sparse_initializers"] > 0
    assert info["metadata"]["force_compress.method"] == "random"


def test_bad_model_exits_2_with_one_line(tmp_path):
    (tmp_path / "junk.onnx").write_text("not a model")
    p = fc("inspect", tmp_path / "junk.onnx")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["export-model", "no_such_net", "--out", "x.onnx"], "unknown torchvision architecture"),
    (["masks", "{model}", "--method", "force", "--sparsity", "0.9"], "--data"),
    (["masks", "{model}", "--method", "random", "--sparsity", "1.5"], "--sparsity"),
])
def test_usage_errors_exit_2_with_one_line(exported, tmp_path, args, message):
    # in-process (click's runner) to keep the suite fast; the subprocess tests above cover the real entry point
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, [a.format(model=exported) for a in args], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_masks_with_data_uses_the_data_pipeline(exported, tmp_path):
    p = fc("masks", exported, "--method", "snip", "--sparsity", 0.9, "--data", "digits", "--batch-size", 16,
           "--out", tmp_path / "snip.npz")
    assert p.returncode == 0, p.stderr
    side = json.loads((tmp_path / "snip.json").read_text())
    assert side["method"] == "snip" and side["density"] == pytest.approx(0.1, abs=1e-3)


