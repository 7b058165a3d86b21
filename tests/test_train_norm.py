"""Train-time normalization for BatchNorm-fused exports (issue 11): inserted where a layer lost its BatchNorm,
folded back so the exported graph keeps the input's nodes, pruned weights exactly zero."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx

from force_core import add_train_norm, calibrate_train_norm, fold_train_norm, recalibrate_train_norm
from force_core.train_norm import FeatureBatchNorm


class _Fused(nn.Module):
    """What an eval-mode export leaves of conv-BN-ReLU blocks: convolutions with biases and no normalization,
    a hidden Linear, and a classifier."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1, bias=False)  # bias-less: nothing to fold into, left alone
        self.bn3 = nn.BatchNorm2d(8)
        self.hidden = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x)) + x
        x = F.relu(self.bn3(self.c3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(F.relu(self.hidden(x)))


def _traced(seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    return fx.symbolic_trace(_Fused())


def test_norms_go_after_fused_layers_only_and_start_as_the_identity():
    gm, ref = _traced(), _traced()
    added = add_train_norm(gm)
    assert [n.layer for n in added] == ["c1", "c2", "hidden"]  # not c3 (BatchNorm follows), not fc (logits)
    assert isinstance(gm.get_submodule(added[2].norm), FeatureBatchNorm)
    gm.eval(), ref.eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-4, atol=1e-5)  # identity up to BatchNorm's eps


def test_folding_gives_the_trained_network_without_its_norms_and_keeps_pruned_weights_exactly_zero():
    gm, plain = _traced(), _traced()
    added = add_train_norm(gm)
    mask = (torch.rand_like(gm.c2.weight) < 0.3).float()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    gm.train()
    for _ in range(5):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
        with torch.no_grad():
            gm.c2.weight.mul_(mask)
    state = fold_train_norm(gm.state_dict(), added)
    assert not any("__train_norm" in k for k in state)
    plain.load_state_dict(state)  # strict: exactly the keys of the network without norms
    gm.eval(), plain.eval()
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(plain(x), gm(x), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(plain.c2.weight[mask == 0]) == 0


def test_calibrated_norms_keep_a_trained_function_and_map_a_pruned_one_back_to_its_statistics():
    gm, ref = _traced(), _traced()
    added = add_train_norm(gm)
    batches = [torch.randn(64, 1, 8, 8) + 0.5 for _ in range(3)]
    calibrate_train_norm(gm, added, batches)
    gm.eval(), ref.eval()
    x = torch.randn(16, 1, 8, 8) + 0.5
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-4, atol=1e-4)  # eval: the dense function, exactly

    def first_norm_output(module):
        out = {}
        handle = module.get_submodule(added[0].norm).register_forward_hook(lambda m, a, o: out.setdefault("y", o))
        module(torch.cat(batches))
        handle.remove()
        return out["y"]

    dense = first_norm_output(gm)
    with torch.no_grad():
        gm.c1.weight.mul_((torch.rand_like(gm.c1.weight) < 0.5).float())  # prune half of c1
    shifted = first_norm_output(gm)
    recalibrate_train_norm(gm, added, batches)
    assert not gm.training and all(not gm.get_submodule(n.norm).training for n in added)
    mapped = first_norm_output(gm)
    for stat in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3))):
        assert (stat(mapped) - stat(dense)).abs().max() < 1e-3  # back to the dense statistics, per channel
        assert (stat(shifted) - stat(dense)).abs().max() > 0.05  # which pruning had moved


def test_a_lone_sample_in_training_mode_uses_the_running_statistics():
    bn = FeatureBatchNorm(4).train()
    x = torch.randn(1, 4)
    torch.testing.assert_close(bn(x), x / torch.sqrt(torch.tensor(1 + bn.eps)))


def _fused_export(path: Path, *, dynamo_like: bool = False) -> str:
    """A small conv-BN network at init exported in eval mode with constant folding: BatchNorm folded away.
    `dynamo_like`: the convolutions also lose their (all-zero) biases, as the dynamo exporter writes them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], do_constant_folding=True, opset_version=17)
    model = onnx.load(str(path))
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if dynamo_like:
        for node in model.graph.node:
            if node.op_type == "Conv":
                del node.input[2:]
        onnx.save(model, str(path))
    return str(path)


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("dynamo_like", [False, True])
def test_compress_trains_a_fused_export_with_norms_and_publishes_the_inputs_nodes(tmp_path, dynamo_like):
    model = _fused_export(tmp_path / "fused.onnx", dynamo_like=dynamo_like)
    args = ["compress", model, "--sparsity", "0.5", "--epochs", "3", "--no-prefect", "--json", "--min-accuracy", "0",
            "--runs-dir", str(tmp_path / "runs"), "--registry", str(tmp_path / "reg")]
    run = _cli(args, Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    run_dir = Path(summary["run_dir"])
    trained = json.loads((run_dir / "train_result.json").read_text())
    assert len(trained["train_norm_layers"]) == 2  # both convolutions; the classifier keeps its logits
    assert len(json.loads((run_dir / "masks.json").read_text())["train_norm_layers"]) == 2
    assert "train-time BatchNorm on 2 fused layer(s)" in run.stderr
    assert "| train-time BatchNorm (BatchNorm-fused layers; folded back at export) | 2 layers" in \
        (run_dir / "report.md").read_text()

    source, exported = onnx.load(model), onnx.load(str(run_dir / "model.sparse.onnx"))
    ops = [(n.op_type, n.name, n.output[0]) for n in exported.graph.node]
    assert ops == [(n.op_type, n.name, n.output[0]) for n in source.graph.node]  # no node added or removed
    inits = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    masks = np.load(run_dir / "masks.npz")
    for name in masks.files:
        assert np.all(inits[name][~masks[name]] == 0.0)
    conv_biases = [inits[n.input[2]] for n in exported.graph.node if n.op_type == "Conv"]
    assert len(conv_biases) == 2 and all(np.any(b != 0) for b in conv_biases)  # the trained shift went somewhere

    if not dynamo_like:
        return
    off = _cli([*args, "--no-train-norm"], Path(__file__).resolve().parents[1])
    assert off.returncode == 0, off.stderr[-2000:]
    assert json.loads((Path(json.loads(off.stdout)["run_dir"]) / "train_result.json").read_text())[
        "train_norm_layers"] == []
