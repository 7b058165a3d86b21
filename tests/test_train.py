"""stages.sparse_train: masks held exactly under SGD (momentum, weight decay) and AdamW, bit-exact resume,
history and figures in the run directory, DDP under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.config import make_config
from pipeline.data import DataSplits, TensorImageDataset, load_data
from pipeline.errors import BadInputError
from stages.sparse_train.training import TrainResult, train_module

ROOT = Path(__file__).resolve().parents[1]


def tiny_cnn(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 8, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def random_masks(module: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in module.named_parameters() if p.dim() > 1}


def small_splits(n_train: int = 384, augment: bool = True) -> DataSplits:
    s = load_data("digits", (1, 8, 8), num_classes=10, seed=0, augment=augment)
    tr = TensorImageDataset(s.train.x[:n_train], s.train.y[:n_train], s.mean, s.std, s.augment)
    plain = tr.with_augment(None)
    return DataSplits(tr, plain, s.val, s.num_classes, s.class_names, s.mean, s.std, s.input_shape, s.source,
                      s.augment)


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    return small_splits()


def cfg(**kw):
    base = dict(model="tiny.onnx", epochs=4, batch_size=64, lr=0.05, device="cpu", seed=0)
    base.update(kw)
    return make_config(**base)


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("adamw", 0.01)])
def test_pruned_weights_stay_exactly_zero_after_many_steps(tmp_path, splits, optimizer, lr):
    model = tiny_cnn()
    masks = random_masks(model, 0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_module(model, masks, splits, cfg(optimizer=optimizer, lr=lr, weight_decay=5e-4, momentum=0.9),
                       tmp_path, progress=False)  # 4 epochs x 6 steps, momentum and weight decay on
    assert isinstance(res, TrainResult) and res.completed and res.epochs == 4
    state = _state(res.state_path)
    ckpt = torch.load(res.checkpoint_path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    opt_state = ckpt["optimizer"]["state"]
    names = [n for n, _ in model.named_parameters()]
    for name, m in masks.items():
        assert torch.count_nonzero(state[name][~m]) == 0, name  # pruned: exactly 0.0
        assert torch.count_nonzero(params[name].detach()[~m]) == 0
        assert not torch.equal(state[name][m], before[name][m]), f"{name}: kept weights did not train"
        for v in opt_state[names.index(name)].values():  # momentum / Adam moments cannot revive them
            if torch.is_tensor(v) and v.shape == m.shape:
                assert torch.count_nonzero(v[~m]) == 0, name
    assert abs(res.density - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())) < 1e-9


def test_learns_digits_and_keeps_per_epoch_figures(tmp_path, splits):
    model = tiny_cnn()
    res = train_module(model, random_masks(model, 0.5), splits, cfg(epochs=5, lr=0.1), tmp_path, progress=True)
    hist = json.loads(res.history_path.read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]
    assert set(hist[0]) >= {"train_loss", "train_acc", "val_acc", "val_loss", "lr", "images_per_s"}
    assert hist[-1]["lr"] < 0.01 * 0.1 + 1e-9  # cosine ends at 0
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert res.val_acc > 0.3 and res.val_acc == hist[-1]["val_acc"]  # chance is 0.1
    assert res.images_per_s > 0 and (tmp_path / "train_curve.png").stat().st_size > 1000


def test_resumed_run_ends_with_identical_weights(tmp_path, splits):
    config = cfg(epochs=4, lr_schedule="step")
    straight = train_module(tiny_cnn(), random_masks(tiny_cnn(), 0.3), splits, config, tmp_path / "a", progress=False)
    part = train_module(tiny_cnn(), random_masks(tiny_cnn(), 0.3), splits, config, tmp_path / "b", progress=False,
                        max_epochs_this_call=2)
    assert not part.completed and part.epochs == 2 and not part.state_path.exists()
    # a new process would rebuild the module from the file: a fresh module, same init
    resumed = train_module(tiny_cnn(), random_masks(tiny_cnn(), 0.3), splits, config, tmp_path / "b", progress=False)
    assert resumed.resumed_from_epoch == 2 and resumed.completed
    a, b = _state(straight.state_path), _state(resumed.state_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # incl. BatchNorm running stats
    ha = json.loads(straight.history_path.read_text())["epochs"]
    hb = json.loads(resumed.history_path.read_text())["epochs"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    assert [h["lr"] for h in ha] == pytest.approx([0.05, 0.005, 0.0005, 0.0005])  # step: x0.1 at 50% and 75%


def test_checkpoint_of_other_masks_is_not_resumed(tmp_path, splits):
    config = cfg(epochs=1)
    train_module(tiny_cnn(), random_masks(tiny_cnn(), 0.3, seed=1), splits, config, tmp_path, progress=False)
    with pytest.warns(UserWarning, match="from scratch"):
        res = train_module(tiny_cnn(), random_masks(tiny_cnn(), 0.3, seed=2), splits, config, tmp_path,
                           progress=False)
    assert res.resumed_from_epoch == 0


def test_dense_run_without_masks_and_zero_epochs(tmp_path, splits):
    res = train_module(tiny_cnn(), {}, splits, cfg(epochs=1), tmp_path / "dense", progress=False)
    assert res.completed and res.density == 1.0
    res0 = train_module(tiny_cnn(), random_masks(tiny_cnn(), 0.1), splits, cfg(epochs=0), tmp_path / "zero",
                        progress=False)
    state = _state(res0.state_path)  # the masked network as it is, scored without training
    assert res0.completed and res0.epochs == 0 and torch.count_nonzero(state["0.weight"]) < state["0.weight"].numel()


def test_masks_that_do_not_fit_the_model_are_refused(tmp_path, splits):
    with pytest.raises(BadInputError, match="shape"):
        train_module(tiny_cnn(), {"0.weight": torch.ones(3, 3, dtype=torch.bool)}, splits, cfg(), tmp_path)
    with pytest.raises(BadInputError, match="does not have"):
        train_module(tiny_cnn(), {"nope.weight": torch.ones(3, dtype=torch.bool)}, splits, cfg(), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_keeps_masks_exact(tmp_path, splits):
    model = tiny_cnn()
    masks = random_masks(model, 0.1)
    res = train_module(model, masks, splits, cfg(device="cuda", epochs=2), tmp_path, progress=False)
    state = _state(res.state_path)
    assert res.device.startswith("cuda")
    for name, m in masks.items():
        assert torch.count_nonzero(state[name][~m]) == 0


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_train import tiny_cnn, random_masks, small_splits, cfg
from stages.sparse_train.training import train_module
model = tiny_cnn(bn=False)
res = train_module(model, random_masks(model, 0.25), small_splits(augment=False), cfg(epochs=2, lr=0.05),
                   sys.argv[1], progress=False)
if os.environ.get("RANK") == "0":  # one line: both ranks printing at once interleave their characters
    print("WORLD", res.world_size)
"""


@pytest.mark.timeout(120)
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): masks exact, weights equal to one process within float tolerance
    (each rank takes half of every global batch; no BatchNorm, no augmentation, so the maths is the same)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=100, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WORLD 2" in out.stdout
    model = tiny_cnn(bn=False)
    masks = random_masks(model, 0.25)
    one = train_module(model, masks, small_splits(augment=False), cfg(epochs=2, lr=0.05), tmp_path / "one",
                       progress=False)
    a, b = _state(one.state_path), _state(tmp_path / "ddp" / "trained.pt")
    for name, m in masks.items():
        assert torch.count_nonzero(b[name][~m]) == 0, name
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
