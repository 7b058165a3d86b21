"""Every form a version publishes (dense FP32, compact sparse-initializer FP32, INT8), each validated by onnxruntime
and listed in the manifest; INT8 keeps pruned weights at exactly 0; an already quantized input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

TINY = ["--sparsity", "0.9", "--epochs", "2", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
        "--min-accuracy", "0.15"]


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).parent / "force-compress"
    return subprocess.run([str(exe), "compress", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_version_holds_dense_compact_and_int8_forms_each_validated(tiny_at_init, tmp_path):
    from pipeline.artifacts import sha256_file
    from pipeline.data import load_data
    from stages.onnx_convert.scoring import onnx_accuracy
    from stages.onnx_convert.sparsity import file_sparsity

    r = _cli([tiny_at_init, *TINY, "--quantize", "int8", "--no-prefect", "--json"], tmp_path)

    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert list(s["stage_seconds"]) == ["import", "masks", "sparse-train", "export", "quantize", "validate", "publish"]
    version = tmp_path / "registry" / "tiny" / "v1"
    manifest = json.loads((version / "manifest.json").read_text())
    arts = {a["role"]: a for a in manifest["artifacts"]}
    assert manifest["primary"] == "model.onnx" and arts["fp32"]["primary"] and arts["fp32"]["file"] == "model.onnx"
    assert {"fp32", "compact", "int8"} <= set(arts)
    assert arts["compact"]["size"] < arts["fp32"]["size"] and arts["int8"]["size"] < arts["fp32"]["size"]
    val = load_data("digits", (1, 8, 8), num_classes=10, augment=False).val
    for a in arts.values():
        path = version / a["file"]
        assert sha256_file(path) == a["sha256"] and a["size"] == path.stat().st_size
        assert abs(onnx_accuracy(path, val)[0] - a["top1"]) < 1e-9  # what validation measured is this file
        assert set(a["latency_ms"]) == {"1", "32"} and a["latency_ms"]["32"]["p50"] > 0
    assert arts["compact"]["top1"] == arts["fp32"]["top1"]  # the same values, stored sparse
    compact = onnx.load(str(version / "model.compact.onnx"))
    assert len(compact.graph.sparse_initializer) > 0
    fp32 = file_sparsity(onnx.load(str(version / "model.onnx")))
    int8 = file_sparsity(onnx.load(str(version / "model.int8.onnx")))
    assert int8.prunable_total == fp32.prunable_total and int8.prunable_zeros >= fp32.prunable_zeros > 0
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(version / "model.int8.onnx"))
                                                       .graph.node}
    # OpenVINO, the second runtime: it reads the dense and INT8 files with onnxruntime's top-1 and no sparse
    # initializer file, which the manifest marks onnxruntime-only
    pytest.importorskip("openvino")
    for role in ("fp32", "int8"):
        ov = arts[role]["openvino"]
        assert ov["checked"] and ov["reads"] and ov["same_top1"] and not arts[role]["onnxruntime_only"], (role, ov)
        assert abs(ov["top1"] - arts[role]["top1"]) <= 1 / len(val) + 1e-9
    assert arts["compact"]["onnxruntime_only"] and arts["compact"]["openvino"]["reads"] is False
    assert arts["compact"]["openvino"]["checked"] and arts["compact"]["openvino"]["why"]
    md = (version / "report.md").read_text()
    assert "**onnxruntime only**" in md
    assert "What each form buys" in md and "INT8 ÷ FP32 at batch 32" in md and "calibrated on" in md
    checks = json.loads((version / "report.json").read_text())["checks"]
    assert {"min_accuracy_int8", "int8_sparsity", "min_accuracy_compact"} <= {c["name"] for c in checks}


def test_an_already_quantized_model_with_quantize_exits_2_before_any_work(tiny_digits, tmp_path):
    from stages.quantize import quantize_int8

    path, _, splits = tiny_digits
    x, _ = splits.train.batch(__import__("torch").arange(64))
    quantized = quantize_int8(path, tmp_path / "q.onnx", x.numpy()).out_path

    r = _cli([str(quantized), *TINY, "--quantize", "int8", "--no-prefect"], tmp_path)

    assert r.returncode == 2, r.stderr[-2000:]
    assert "already quantized" in r.stderr and "drop --quantize int8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_int8_sparsity_is_read_through_dequantize_linear(tiny_digits, tmp_path):
    from stages.export_onnx import write_values
    from stages.onnx_convert.sparsity import file_sparsity
    from stages.onnx_convert.to_torch import load_module
    from stages.quantize import quantize_int8

    path, _, splits = tiny_digits
    model = onnx.load(path)
    module, param_map = load_module(path)
    state = module.state_dict()
    rng = np.random.default_rng(0)
    masks = {i: rng.random(param_map.entries[param_map.to_param(i)].onnx_shape) < 0.3
             for i in param_map.prunable_initializers}
    write_values(model, param_map, state, masks)
    sparse = tmp_path / "sparse.onnx"
    onnx.save(model, str(sparse))
    x, _ = splits.train.batch(__import__("torch").arange(64))

    q = quantize_int8(sparse, tmp_path / "q.onnx", x.numpy())

    before, after = file_sparsity(model), file_sparsity(onnx.load(str(q.out_path)))
    assert after.prunable_total == before.prunable_total
    assert after.prunable_zeros >= before.prunable_zeros >= 0.6 * before.prunable_total
    assert q.calibration_images == 64 and isinstance(q.fp32_nodes, tuple)


def test_the_gate_refuses_an_int8_model_that_loses_more_than_max_drop():
    from pipeline.config import make_config
    from stages.measure.gate import form_checks

    config = make_config(model="m.onnx", min_accuracy=0.5, baseline_accuracy=0.9, max_drop=0.01)
    fp32 = {"role": "fp32", "top1": 0.95, "prunable_zeros": 90, "prunable_total": 100}
    int8 = {"role": "int8", "top1": 0.93, "prunable_zeros": 89, "prunable_total": 100}

    checks = {c.name: c for c in form_checks(config, [fp32, int8])}

    assert not checks["int8_max_drop"].passed and "over by 0.0100" in checks["int8_max_drop"].message
    assert not checks["int8_sparsity"].passed and "lost their zero" in checks["int8_sparsity"].message
    assert checks["min_accuracy_int8"].passed


def test_nodes_the_quantizer_leaves_in_fp32_are_named(tmp_path, to_onnx):
    import torch
    import torch.nn as nn

    from stages.quantize import quantize_int8

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(128, 10))
    path = to_onnx(net, tmp_path / "tanh.onnx")
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)

    q = quantize_int8(path, tmp_path / "q.onnx", x)

    assert any(n.endswith("(Tanh)") for n in q.fp32_nodes), q.fp32_nodes  # no INT8 Tanh kernel
    assert not any(n.endswith("(Conv)") or n.endswith("(Gemm)") for n in q.fp32_nodes), q.fp32_nodes


def test_int8_applies_to_the_channel_cut_model_too(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, "--structure", "channel", "--channel-multiple", "1", "--sparsity", "0.5",
              *TINY[2:], "--quantize", "int8", "--no-prefect", "--json"], tmp_path)

    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    roles = {f["role"]: f for f in s["forms"]}
    assert {"fp32", "int8"} <= set(roles) and s["structure"] == "channel"
    assert roles["fp32"]["size"] < roles["input"]["size"]  # the cut; INT8's QDQ nodes outweigh 1,000 weights here
    assert roles["int8"]["top1"] >= 0.15
    assert list(s["stage_seconds"]) == ["import", "masks", "cut", "sparse-train", "export", "quantize", "validate",
                                        "publish"]


def test_openvino_models_are_released_before_the_forms_are_timed(tmp_path, to_onnx, monkeypatch):
    """OpenVINO keeps the buffers of the largest batch it scored while a compiled model lives: halonet_h1 (dynamo,
    256×256) reached 21.4 GB resident in validation with them held through the timing at batch 32. Each compiled
    model is gone (weakly referenced, collected) before the first timed round."""
    import weakref

    import torch

    from pipeline.data import load_data
    from stages.measure import forms as forms_module

    pytest.importorskip("openvino")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    model = Path(to_onnx(net, tmp_path / "m.onnx", size=8))
    compiled = []
    compile_openvino = forms_module.compile_openvino

    def tracked(path):
        made = compile_openvino(path)
        if made[0] is not None:
            compiled.append(weakref.ref(made[0]))
        return made

    alive_when_timed = []
    timing = forms_module.interleaved_latency

    def timed(*args, **kwargs):
        alive_when_timed.append(sum(ref() is not None for ref in compiled))
        return timing(*args, **kwargs)

    monkeypatch.setattr(forms_module, "compile_openvino", tracked)
    monkeypatch.setattr(forms_module, "interleaved_latency", timed)
    val = load_data("digits", (1, 8, 8), num_classes=10, seed=0, augment=False).val
    records = forms_module.measure_forms([forms_module.Form("input", model), forms_module.Form("fp32", model)], val,
                                         (1, 8, 8), runs=3, batches=(1,))

    assert compiled and alive_when_timed == [0]
    assert records[1]["openvino"]["reads"] and records[1]["openvino"]["same_top1"]
