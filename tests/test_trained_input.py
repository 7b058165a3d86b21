"""A trained model in: its own normalisation stated by --mean/--std or read from its metadata, its score on the
held-out split taken before any work and used as the baseline of --max-drop, and bad statements refused at once."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data import load_data
from pipeline.preprocessing import (
    NORMALIZATION_FROM_DATA,
    NORMALIZATION_FROM_MODEL,
    NORMALIZATION_FROM_OPTIONS,
    PREPROCESSING_KEY,
)
from stages.onnx_convert.scoring import onnx_accuracy

FAST = ["--steps", "2", "--mask-batch-size", "64", "--batch-size", "64", "--no-prefect", "--json"]


@pytest.fixture(scope="module")
def raw_trained(tmp_path_factory, to_onnx):
    """A CNN trained by this test on digits as [0, 1] grey levels, with no mean/std at all (what its user knows and
    the data's statistics do not say), exported in eval mode; and the plain onnxruntime top-1 on the held-out split
    under that preprocessing."""
    import torch.nn as nn

    torch.manual_seed(0)
    raw = load_data("digits", (1, 8, 8), num_classes=10, augment=False, mean=(0.0,), std=(1.0,))
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = raw.train.batch(torch.arange(len(raw.train)))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    path = to_onnx(net, tmp_path_factory.mktemp("raw") / "raw.onnx")
    return path, onnx_accuracy(path, raw.val)[0]


def _compress(model, tmp_path, *args):
    r = CliRunner().invoke(main, ["compress", str(model), *FAST, "--runs-dir", str(tmp_path / "runs"),
                                  "--registry", str(tmp_path / "registry"), *args])
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def test_the_input_is_scored_with_the_normalisation_it_was_trained_with(raw_trained, tmp_path):
    model, plain_top1 = raw_trained
    assert plain_top1 > 0.9  # the test's own training worked
    r, s = _compress(model, tmp_path, "--mean", "0", "--std", "1", "--sparsity", "0.5", "--epochs", "1",
                     "--min-accuracy", "0")
    assert r.exit_code == 0, r.output
    assert abs(s["input_top1"] - plain_top1) <= 0.005 and s["normalization"] == NORMALIZATION_FROM_OPTIONS
    assert "input model: top-1" in r.stderr and NORMALIZATION_FROM_OPTIONS in r.stderr
    # the output records what its input was given, for predict and for the next run
    props = {p.key: p.value for p in onnx.load(f"{s['registry_path']}/model.onnx").metadata_props}
    record = json.loads(props[PREPROCESSING_KEY])
    assert (record["mean"], record["std"], record["normalization_from"]) == ([0.0], [1.0], NORMALIZATION_FROM_OPTIONS)
    # left to itself, a file without a record is normalised with the data's statistics, and says so
    r, s = _compress(model, tmp_path / "guessed", "--sparsity", "0.5", "--epochs", "0", "--min-accuracy", "0")
    assert r.exit_code == 0, r.output
    assert s["normalization"] == NORMALIZATION_FROM_DATA


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory):
    """torchvision's ResNet with one BasicBlock per stage (resnet18 has two: the same family at half its cost)
    trained by this test on digits at 3x16x16 as [0, 1] grey levels (no mean/std), exported in eval mode (BatchNorm
    folded), and the plain onnxruntime top-1 on the held-out split."""
    from torchvision.models.resnet import BasicBlock, ResNet

    from pipeline.data import make_loader

    torch.manual_seed(0)
    splits = load_data("digits", (3, 16, 16), num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(splits.train, 64, seed=0)
    epochs = 6
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
    path = tmp_path_factory.mktemp("resnet") / "resnet10_digits.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    return path, onnx_accuracy(path, splits.val)[0]


def test_a_trained_input_told_only_its_preprocessing_and_max_drop_keeps_its_accuracy(trained_resnet, tmp_path):
    """`compress --sparsity 0.9 --max-drop 0.02` and the model's preprocessing, nothing else: the input scores as
    plain onnxruntime scores it, the recipe fine-tunes it, and what is published is within 2 points; fed back in
    (its preprocessing now read from its own metadata), the same at 0.95."""
    model, plain_top1 = trained_resnet
    where = ["--runs-dir", str(tmp_path / "runs"), "--registry", str(tmp_path / "registry"), "--no-prefect", "--json"]
    r = CliRunner().invoke(main, ["compress", str(model), "--mean", "0,0,0", "--std", "1,1,1", "--sparsity", "0.9",
                                  "--max-drop", "0.02", *where])
    s = json.loads(r.stdout)
    print(f"trained resnet {s['input_top1']:.4f} (plain onnxruntime {plain_top1:.4f}) -> 0.9: {s['top1']:.4f}; "
          f"{s['recipe']}")
    assert plain_top1 > 0.95  # the test's own training worked
    assert r.exit_code == 0 and s["published"], r.output
    assert abs(s["input_top1"] - plain_top1) <= 0.005
    assert s["recipe"].startswith("recipe: finetune (auto") and "recipe: finetune" in r.stderr
    assert s["top1"] >= s["input_top1"] - 0.02 and s["baseline_accuracy"] == s["input_top1"]

    published = f"{s['registry_path']}/model.onnx"
    r = CliRunner().invoke(main, ["compress", published, "--sparsity", "0.95", "--max-drop", "0.02", "--name", "again",
                                  *where])
    again = json.loads(r.stdout)
    print(f"published model fed back {again['input_top1']:.4f} -> 0.95: {again['top1']:.4f}")
    assert r.exit_code == 0 and again["published"], r.output
    assert again["normalization"] == NORMALIZATION_FROM_MODEL
    assert abs(again["input_top1"] - s["top1"]) <= 0.005
    assert again["top1"] >= again["input_top1"] - 0.02


def test_max_drop_without_a_baseline_is_measured_from_the_input(raw_trained, tmp_path):
    model, _ = raw_trained
    r, s = _compress(model, tmp_path, "--mean", "0", "--std", "1", "--sparsity", "0.95", "--method", "random",
                     "--epochs", "0", "--min-accuracy", "0", "--max-drop", "0.02", "--no-cut-check")
    assert s is not None, r.output
    assert s["baseline_accuracy"] == s["input_top1"]
    drop = [f for f in s["failures"] if f.startswith("accuracy drop")]
    assert r.exit_code == 1 and drop and f"from baseline {s['input_top1']:.4f}" in drop[0]


def test_a_published_model_fed_back_brings_its_own_normalisation(raw_trained, tmp_path):
    model, _ = raw_trained
    r, first = _compress(model, tmp_path, "--mean", "0", "--std", "1", "--sparsity", "0.5", "--epochs", "1",
                         "--min-accuracy", "0")
    assert r.exit_code == 0 and first["published"], r.output
    published = f"{first['registry_path']}/model.onnx"
    r, again = _compress(published, tmp_path / "again", "--sparsity", "0.6", "--epochs", "0", "--min-accuracy", "0")
    assert r.exit_code == 0, r.output
    assert again["normalization"] == NORMALIZATION_FROM_MODEL
    assert abs(again["input_top1"] - first["top1"]) <= 0.005  # the published file, scored as validation scored it


def test_an_untrained_input_with_max_drop_gets_one_clear_warning(tiny_at_init, tmp_path):
    r, s = _compress(tiny_at_init, tmp_path, "--sparsity", "0.5", "--epochs", "0", "--min-accuracy", "0",
                     "--max-drop", "0.5")
    assert s is not None, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: the input scores")]
    assert len(warnings) == 1 and "--baseline-accuracy" in warnings[0] and "sweep" in warnings[0]


@pytest.mark.parametrize("args, message", [
    (["--mean", "0.5"], "give --mean and --std together"),
    (["--mean", "0.5", "--std", "-1"], "--std must be positive"),
    (["--mean", "0.5,0.5", "--std", "1"], "one per input channel"),
    (["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"], "input has 1 channel(s)"),
])
def test_a_normalisation_that_does_not_fit_is_exit_2_before_any_work(raw_trained, tmp_path, args, message):
    model, _ = raw_trained
    r, _ = _compress(model, tmp_path, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_data_parallel_training_processes_normalise_as_the_run_does(raw_trained, tmp_path):
    model, _ = raw_trained
    r, s = _compress(model, tmp_path, "--mean", "0", "--std", "1", "--sparsity", "0.5", "--epochs", "1",
                     "--min-accuracy", "0", "--nproc", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    trained = json.loads((Path(s["run_dir"]) / "train_result.json").read_text())  # written by rank 0
    assert (trained["mean"], trained["std"]) == ([0.0], [1.0])


def test_a_diverging_training_stops_with_exit_1_and_one_line(raw_trained, tmp_path):
    model, _ = raw_trained
    r, _ = _compress(model, tmp_path, "--mean", "0", "--std", "1", "--sparsity", "0.5", "--epochs", "2",
                     "--lr", "1e6", "--min-accuracy", "0")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "epoch 1 of 2" in errors[0], r.stderr
    assert not (tmp_path / "registry").exists()
    assert not list((tmp_path / "runs").glob("*/checkpoint.pt"))  # the diverged epoch is not kept to resume from


class _TinyViT(torch.nn.Module):
    """Patches, one attention block, a head: what makes a network an attention network to the recipe."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(1, 16, 2, stride=2)
        self.norm = torch.nn.LayerNorm(16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        t = self.norm(self.patch(x).flatten(2).transpose(1, 2))
        return self.head((t + self.attn(t, t, t, need_weights=False)[0]).mean(1))


def test_an_attention_network_trains_with_adamw_unless_told_otherwise(tmp_path, tiny_at_init):
    from stages.onnx_convert.model_checks import has_attention

    torch.manual_seed(0)
    vit = tmp_path / "vit.onnx"
    torch.onnx.export(_TinyViT().eval(), (torch.zeros(1, 1, 8, 8),), str(vit), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "N"}})
    assert has_attention(onnx.load(str(vit))) and not has_attention(onnx.load(str(tiny_at_init)))
    seen = {}
    for name, model, extra in (("vit", vit, []), ("cnn", tiny_at_init, []), ("told", vit, ["--optimizer", "sgd"])):
        r = CliRunner().invoke(main, ["compress", str(model), "--sparsity", "0.5", "--epochs", "1", "--max-steps", "1",
                                      "--min-accuracy", "0", "--runs-dir", str(tmp_path / "runs"), "--registry",
                                      str(tmp_path / "reg"), "--name", name, *extra, *FAST])
        assert r.exit_code == 0, r.output[-2000:]
        s = json.loads(r.stdout)
        config = json.loads((Path(s["run_dir"]) / "config.json").read_text())
        seen[name] = (config["optimizer"], config["lr"], config["weight_decay"], s["recipe"])
    assert seen["vit"][:3] == ("adamw", 1e-3, 0.05) and "attention (a MatMul of two activations): adamw lr 0.001" \
        in seen["vit"][3]
    assert seen["cnn"][:3] == ("sgd", 0.1, 5e-4) and "attention" not in seen["cnn"][3]
    assert seen["told"][:3] == ("sgd", 1e-3, 0.05)  # --optimizer given wins; the rest is still the recipe's
