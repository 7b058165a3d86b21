"""Eval-mode validation of a sparse-trained BatchNorm-fused network (the mobilenet_v3_small divergence report).

Training normalises the train-time BatchNorms with batch statistics; validation and the exported file use their
running statistics. Those trail the weights (an exponential average over the last steps, from the identity start
of mean 0 and variance 1 − ε), and a pruned channel left with a few weights varies so little that 1/√(σ² + ε) turns
the lag into offsets that compound from layer to layer: the validation loss sat at chance or blew up (2e4, 1e7,
NaN) while the training loss fell. `train_module` re-estimates them on training images with each epoch's final
weights before it validates, so eval mode computes what training does, and what is validated is what is folded
and exported. Channels left constant (float noise only) output their β exactly: no 1/√ε-amplified rounding, in
eval mode or in the folded file (where a large W·s·x cancelled against the bias: torch and onnxruntime disagreed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from force_core import add_train_norm, fold_train_norm, recalibrate_train_norm
from pipeline.config import make_config
from pipeline.data import DataSplits, TensorImageDataset, load_data
from stages.sparse_train.training import evaluate, train_module


class _FusedSE(nn.Module):
    """What an eval-mode export leaves of a conv-BN network with a squeeze-excitation block: every BatchNorm folded
    into a biased Conv/Linear. The pooled excitation path and a sparse mask give near-constant channels."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.se1 = nn.Conv2d(16, 8, 1)
        self.se2 = nn.Conv2d(8, 16, 1)
        self.hidden = nn.Linear(16, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.adaptive_avg_pool2d(x * s, 1).flatten(1)
        return self.fc(F.relu(self.hidden(x)))


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    s = load_data("digits", (1, 8, 8), num_classes=10, seed=0, augment=False)
    train = TensorImageDataset(s.train.x[:384], s.train.y[:384], s.mean, s.std, s.augment)
    return DataSplits(train, train.with_augment(None), s.val, s.num_classes, s.class_names, s.mean, s.std,
                      s.input_shape, s.source, s.augment)


@pytest.mark.parametrize("seed", [0, 1])
def test_eval_mode_validation_follows_training_and_is_what_is_exported(tmp_path, splits, seed):
    torch.manual_seed(seed)
    gm = fx.symbolic_trace(_FusedSE())
    norms = add_train_norm(gm)
    assert [n.layer for n in norms] == ["c1", "c2", "se1", "se2", "hidden"]
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < 0.2 for n, p in gm.named_parameters() if p.dim() > 1}
    config = make_config(model="tiny.onnx", epochs=4, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                         device="cpu", seed=seed)  # 4 epochs of 6 steps: the running averages keep 8% of the start
    res = train_module(gm, masks, splits, config, tmp_path, progress=False, plot=False, train_norms=norms)
    assert res.completed
    # Training learns (the same with or without the fix: running statistics do not enter a training step)...
    assert res.train_loss < math.log(10) - 0.25
    # ...and eval mode follows it. Without re-estimated statistics the validation loss stayed at ln 10 = 2.303 and
    # the accuracy at 0.101 (one class) in every epoch, the training loss falling to 1.85-1.97.
    assert res.val_loss < res.train_loss + 0.2, (res.train_loss, res.val_loss)
    assert res.val_acc >= 0.2
    # The folded trained.pt (the exported weights) computes exactly what was validated.
    plain = _FusedSE()
    plain.load_state_dict(torch.load(res.state_path, map_location="cpu", weights_only=True))
    val_loss, val_acc = evaluate(plain, splits.val, device="cpu")
    assert val_loss == pytest.approx(res.val_loss, rel=1e-4, abs=1e-5) and val_acc == pytest.approx(res.val_acc)


def test_constant_channels_output_their_beta_exactly_in_eval_mode_and_in_the_fold():
    from force_core.train_norm import CONSTANT_VAR, silence_constant_channels

    torch.manual_seed(0)
    gm, plain = fx.symbolic_trace(_FusedSE()), _FusedSE()
    norms = add_train_norm(gm)
    with torch.no_grad():
        gm.c1.weight[0] = 0.0  # c1's channel 0: its bias, a constant
        gm.c2.weight[:2, 1:] = 0.0  # c2's channels 0 and 1 read only that constant (nonzero weights)
        gm.c2.weight[2] = 0.0  # and channel 2 nothing: the bias
        for norm in (gm.c1__train_norm, gm.c2__train_norm):
            norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    batches = [torch.randn(64, 1, 8, 8) for _ in range(3)]
    recalibrate_train_norm(gm, norms, batches)
    assert (gm.c2__train_norm.running_var[:3] < CONSTANT_VAR).all()
    assert (gm.c2__train_norm.running_var[3:] > 1e-3).all()  # the others vary: left alone
    beta = gm.c2__train_norm.bias.detach().clone()
    assert silence_constant_channels(gm, norms) >= 4  # c1's channel 0 and c2's 0, 1, 2
    assert (gm.c2__train_norm.weight[:3] == 0).all() and (gm.c2__train_norm.weight[3:] != 0).all()
    out = {}
    gm.c2__train_norm.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    gm.eval()
    x = torch.randn(16, 1, 8, 8) * 3
    logits = gm(x)
    assert torch.equal(out["y"][:, :3], beta[:3].reshape(1, 3, 1, 1).expand(16, 3, 8, 8))  # exactly β
    state = fold_train_norm(gm.state_dict(), norms)
    assert torch.count_nonzero(state["c2.weight"][:3]) == 0 and torch.equal(state["c2.bias"][:3], beta[:3])
    plain.load_state_dict(state)
    torch.testing.assert_close(plain.eval()(x), logits, rtol=1e-5, atol=1e-5)
