"""`compress --structure channel` end to end: channel masks, the graph cut proven against the masked model, the
cut network trained and published smaller; its bad input (nothing channel-prunable, a sparsity beyond every
removable channel) stops with exit 2 and one line; and the figures the report adds (MACs, parameters, latency
ratio) on real exported models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

# conv1 [8,1,3,3] 72, conv2 [8,8,3,3] 576, linear [10,128] 1280 weights; one channel per group at least keeps
# 9 + 9 + 10·16 = 178 of 1928: the largest reachable sparsity is 1 - 178/1928 = 0.9077.
TINY = ["--epochs", "2", "--steps", "3", "--mask-batch-size", "64", "--batch-size", "64", "--min-accuracy", "0.15",
        "--channel-multiple", "1"]  # its layers have 8 channels: blocks of one


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PREFECT_LOGGING_LEVEL": "INFO"}
    exe = Path(sys.executable).parent / "force-compress"
    return subprocess.run([str(exe), "compress", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("budget", ["macs", "params"])
def test_channel_structure_publishes_a_smaller_model_that_computes_what_was_validated(budget, tiny_at_init,
                                                                                       tmp_path):
    import numpy as np

    from stages.onnx_convert import runtime

    # the default budget (MACs) through the Prefect flow (the served deployment runs the same flow)
    given = [] if budget == "macs" else ["--budget", "params", "--no-prefect"]
    r = _cli([tiny_at_init, "--structure", "channel", "--sparsity", "0.5", *TINY, "--json", *given], tmp_path)

    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["structure"] == "channel" and s["published"] and s["budget"] == budget
    assert list(s["stage_seconds"]) == ["import", "masks", "cut", "sparse-train", "export", "validate", "publish"]
    assert ("stage cut" if budget == "macs" else "] cut") in r.stderr and "channels kept" in r.stderr
    before, after = s["costs"]["input"], s["costs"]["exported"]
    assert after["macs"] < before["macs"] and after["params"] < before["params"]
    assert s["sizes"]["exported"] < s["sizes"]["input"]
    report = json.loads((tmp_path / s["run_dir"] / "report.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "sparsity")
    if budget == "macs":  # half the weight layers' multiply-accumulates per image are gone
        assert after["weight_macs"] <= 0.5 * before["weight_macs"] + 1
        assert check["message"].startswith("MACs removed 0.5") and "vs target 0.5000" in check["message"]
    else:  # the removed weights are gone from the file, not zeros in it: at least half the prunable weights
        assert after["prunable_weights"] <= 0.5 * before["prunable_weights"] + 1 and s["sparsity"] >= 0.5
        assert check["message"].startswith("sparsity 0.5")
    assert {"median", "p10", "p90", "verdict"} <= set(s["latency_ms"]["ratio"])
    run_dir = tmp_path / s["run_dir"]
    meta = json.loads((run_dir / "masks.json").read_text())
    assert meta["structure"] == "channel" and 0 < meta["channels_kept"] < meta["channels_total"]
    assert all(len(v) >= 1 for v in meta["channels"].values())  # no group loses every channel
    md = (run_dir / "report.md").read_text()
    assert "channels kept" in md and "MACs" in md and "interleaved" in md

    published = next((tmp_path / "registry").glob("tiny/v1/*.onnx"))
    model = onnx.load(str(published))
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(tiny_at_init).graph.input]
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8), dtype=np.float32)
    assert runtime.run(runtime.session(str(published)), x).shape == (4, 10)


def test_nothing_channel_prunable_exits_2_with_one_line_and_writes_nothing(tmp_path, to_onnx):
    import torch.nn as nn

    path = to_onnx(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "linear.onnx")

    r = _cli([path, "--structure", "channel", "--sparsity", "0.5", *TINY, "--no-prefect"], tmp_path)

    assert r.returncode == 2, r.stderr[-3000:]
    assert "no channel that can be pruned" in r.stderr and "--structure unstructured" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()


@pytest.mark.parametrize("budget, sparsity, reachable", [("params", "0.95", "0.907"), ("macs", "0.99", "0.9693")])
def test_a_sparsity_beyond_every_removable_channel_exits_2_naming_the_largest(budget, sparsity, reachable,
                                                                               tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, "--structure", "channel", "--sparsity", sparsity, "--budget", budget, *TINY,
              "--no-prefect"], tmp_path)

    assert r.returncode == 2, r.stderr[-3000:]
    assert f"largest reachable sparsity is {reachable}" in r.stderr and "Traceback" not in r.stderr
    assert ("MACs per image" in r.stderr) == (budget == "macs")
    assert not (tmp_path / "runs").exists()


def test_a_method_without_a_channel_form_is_refused_up_front(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, "--structure", "channel", "--method", "grasp", "--sparsity", "0.5", "--no-prefect"],
             tmp_path)

    assert r.returncode == 2 and "unknown channel method 'grasp'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_macs_budget_on_single_weights_is_refused_up_front(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, "--budget", "macs", "--sparsity", "0.5", "--no-prefect"], tmp_path)

    assert r.returncode == 2 and "--budget macs needs --structure channel" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_model_costs_count_resnet18_macs_and_parameters(tmp_path):
    from stages.onnx_convert.costs import model_costs
    from stages.onnx_convert.torchvision_export import export_torchvision

    path = export_torchvision("resnet18", tmp_path / "r18.onnx", num_classes=1000, input_size=(224, 224))
    c = model_costs(onnx.load(str(path)), (3, 224, 224))

    assert c.params == pytest.approx(11_689_512, rel=1e-3)  # torchvision's published count
    assert c.macs == pytest.approx(1.814e9, rel=0.01)  # the usual 1.8 GMACs
    assert c.nonzero_prunable_weights == c.prunable_weights


def test_paired_latency_gives_a_ratio_with_its_spread(tmp_path, to_onnx):
    import torch.nn as nn

    from stages.measure.latency import paired_latency, ratio_verdict
    from stages.onnx_convert import runtime

    small = to_onnx(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "small.onnx")
    big = to_onnx(nn.Sequential(nn.Conv2d(1, 256, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)), tmp_path / "big.onnx")

    lat = paired_latency(runtime.session(big), runtime.session(small), (1, 8, 8), runs=10, budget_s=2.0)

    assert lat["input"]["runs"] == lat["exported"]["runs"] >= 5
    assert lat["ratio"]["p10"] <= lat["ratio"]["median"] <= lat["ratio"]["p90"] < 1.0
    assert lat["ratio"]["verdict"].endswith("faster")
    assert ratio_verdict(1.0, 0.9, 1.1) == "no measurable difference"
    assert ratio_verdict(2.0, 1.8, 2.2) == "2.00x slower"
