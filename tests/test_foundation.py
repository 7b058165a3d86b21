"""Facts of the stack and the shared plumbing (config, errors, atomic files, devices)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch

from pipeline.artifacts import atomic_path, run_dir_for, sha256_file, write_json_atomic
from pipeline.config import CompressConfig, make_config
from pipeline.devices import ort_providers, resolve_device
from pipeline.errors import BadInputError, EnvironmentProblem, GateFailedError


def _relu_model(ir_version: int | None) -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def test_onnx_helper_default_ir_version_is_newer_than_onnxruntime_reads():
    # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13. If either side
    # moves, this test says so and models built with onnx.helper may drop the explicit version.
    model = _relu_model(None)
    if model.ir_version <= 13:
        pytest.skip(f"onnx {onnx.__version__} writes IR {model.ir_version}; the mismatch is gone")
    with pytest.raises(Exception, match="(?i)ir.?version|Unsupported model"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_onnx_helper_model_with_explicit_ir_version_runs():
    model = _relu_model(10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.array([-1.0, 2.0], dtype=np.float32)})
    assert y.tolist() == [0.0, 2.0]


def test_onnxruntime_gets_cuda_provider_only_with_a_cuda_device():
    providers = ort_providers("cuda")
    if torch.cuda.is_available():
        assert providers[0] == "CUDAExecutionProvider"
    else:
        assert providers == ["CPUExecutionProvider"]
    assert ort_providers("cpu") == ["CPUExecutionProvider"]


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(EnvironmentProblem, match="no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_config_defaults_and_density_edge():
    cfg = CompressConfig(model="m.onnx", sparsity=0.99)
    assert cfg.density == pytest.approx(0.01)
    assert cfg.model_name == "m"
    assert "model" not in cfg.fingerprint() and "registry" not in cfg.fingerprint()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 0.0}, "sparsity"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"epochs": -1}, "epochs"),
        ({"unknown_field": 3}, "unknown_field"),
    ],
)
def test_bad_config_is_one_clear_line_with_exit_code_2(values, message):
    with pytest.raises(BadInputError, match=message) as info:
        make_config(model="m.onnx", **values)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_exit_codes():
    assert GateFailedError.exit_code == 1
    assert BadInputError.exit_code == 2
    assert EnvironmentProblem.exit_code == 3


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    write_json_atomic(target, {"a": 1})
    assert os.listdir(tmp_path) == ["out.json"]
    assert len(sha256_file(target)) == 64


def test_run_dir_depends_on_model_and_config(tmp_path):
    a = run_dir_for(tmp_path, "ab" * 32, {"sparsity": 0.9})
    assert a == run_dir_for(tmp_path, "ab" * 32, {"sparsity": 0.9})
    assert a != run_dir_for(tmp_path, "ab" * 32, {"sparsity": 0.99})
    assert a != run_dir_for(tmp_path, "cd" * 32, {"sparsity": 0.9})


def test_only_one_onnxruntime_distribution_is_installed():
    # onnxruntime and onnxruntime-gpu install the same module; with both, one uninstall breaks the other.
    from importlib.metadata import PackageNotFoundError, version

    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            version(dist)
            installed.append(dist)
        except PackageNotFoundError:
            pass
    assert len(installed) == 1, installed


def test_atomic_files_get_the_usual_umask_mode_not_owner_only(tmp_path):
    from pipeline.artifacts import FILE_MODE

    path = write_json_atomic(tmp_path / "shared.json", {})
    assert path.stat().st_mode & 0o777 == FILE_MODE
