"""Models and trainings that go wrong in a way the user can fix: each is refused (or warned about) in one line that
names the real cause. The CLI cases run the real command in a subprocess: exit code, one stderr line, no files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from test_cli_contract import TINY, _one_line, _run

from force_core.channels import ChannelFloorError
from force_core.losses import LOSSES
from pipeline.artifacts import RunFiles
from pipeline.config import make_config
from pipeline.data import load_data
from pipeline.errors import BadInputError, ModelShapeError, TrainingDivergedError
from stages.compute_masks import _floor_message
from stages.import_onnx import import_onnx
from stages.onnx_convert.model_io import load_checked
from stages.onnx_convert.scoring import classifier_io
from stages.sparse_train.training import train_module


class _ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x.permute(0, 3, 1, 2)).mean((2, 3)))


def _export(module, path, shape, dynamic=None) -> str:
    torch.onnx.export(module.eval(), (torch.zeros(*shape),), str(path), dynamo=False, input_names=["input"],
                      output_names=["out"], dynamic_axes={"input": {0: "N", **(dynamic or {})}, "out": {0: "N"}})
    return str(path)


def _refused(r, tmp_path) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()
    return _one_line(r)


def test_a_channels_last_input_is_refused_as_nhwc(tmp_path):
    path = _export(_ChannelsLast(), tmp_path / "nhwc.onnx", (1, 32, 32, 3))

    line = _refused(_run(["compress", path, *TINY, "--no-prefect"], tmp_path), tmp_path)

    assert "NHWC" in line and "NCHW" in line and "re-export" in line and "32 channels" not in line


def test_a_dynamic_channel_axis_is_named_and_image_size_is_not_suggested(tmp_path):
    path = _export(_GlobalMean(), tmp_path / "c.onnx", (1, 3, 32, 32), {1: "C"})

    for refuse in (lambda: classifier_io(load_checked(path), (32, 32)),
                   lambda: import_onnx(path, tmp_path, image_size=(32, 32))):
        with pytest.raises(ModelShapeError) as e:
            refuse()
        assert "channel axis is dynamic" in str(e.value) and "--image-size sets only H and W" in str(e.value)
        assert "fixed channel count" in str(e.value)


class _GlobalMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 10)

    def forward(self, x):
        return self.fc(x.mean((1, 2, 3)).unsqueeze(1))


def test_an_opset_newer_than_onnx_knows_is_named(tmp_path, tiny_at_init):
    model = onnx.load(tiny_at_init)
    for o in model.opset_import:
        o.version = 30
    onnx.save(model, str(tmp_path / "new.onnx"))
    limit = onnx.defs.onnx_opset_version()

    line = _refused(_run(["compress", str(tmp_path / "new.onnx"), *TINY, "--no-prefect"], tmp_path), tmp_path)

    assert line == (f"error: opset 30 of domain ai.onnx is newer than this installation supports (onnx "
                    f"{onnx.__version__} supports up to {limit}); re-export with --opset/opset_version ≤ {limit}")


def test_non_finite_weights_name_the_initializer(tmp_path, tiny_at_init):
    model = onnx.load(tiny_at_init)
    t = model.graph.initializer[0]
    a = numpy_helper.to_array(t).copy()
    a.flat[:2], a.flat[2] = np.nan, np.inf
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(model, str(tmp_path / "nan.onnx"))

    line = _refused(_run(["compress", str(tmp_path / "nan.onnx"), *TINY, "--no-prefect"], tmp_path), tmp_path)

    assert f"initializer {t.name!r} holds 3 NaN/Inf value(s)" in line and "parity" not in line
    with pytest.raises(BadInputError, match="holds 3 NaN/Inf"):  # import alone checks too, before parity
        import_onnx(tmp_path / "nan.onnx", tmp_path)


class _InfPaddedPool(nn.Module):
    """A max pool padded with -inf by hand (NASNet, PNASNet, ResNetV2 stems): dynamo stores the -inf as a
    one-entry initializer, the Pad's value."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        x = F.max_pool2d(F.pad(self.conv(x), (1, 1, 1, 1), value=float("-inf")), 3, stride=2)
        return self.fc(x.mean((2, 3)))


def test_an_infinite_pad_value_is_a_bound_not_a_bad_weight_but_nan_there_is_refused(tmp_path):
    path = tmp_path / "pad.onnx"
    torch.onnx.export(_InfPaddedPool().eval(), (torch.zeros(2, 3, 16, 16),), str(path), dynamo=True,
                      input_names=["input"], output_names=["out"],
                      dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    model = onnx.load(str(path))
    inf = [t for t in model.graph.initializer if np.isinf(numpy_helper.to_array(t)).any()]
    assert [t.dims for t in inf] in ([[]], [[1]]), "the exporter no longer writes the pad value as an initializer"

    assert import_onnx(path, tmp_path / "ok").parity_max_rel <= 1e-4

    inf[0].CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(inf[0]).shape, np.nan, np.float32),
                                            inf[0].name))
    onnx.save(model, str(tmp_path / "nan.onnx"))
    with pytest.raises(BadInputError, match=f"initializer {inf[0].name!r} holds 1 NaN/Inf"):
        import_onnx(tmp_path / "nan.onnx", tmp_path / "nan")


class _StandardisedConv(nn.Module):
    """timm's StdConv2d (NFNet, BiT): the convolution's weight is standardised at every call. Wide enough that the
    dynamo exporter's optimizer does not fold it (it folds a few thousand entries, as it did the stem's in NFNet)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 1024, 3), nn.Linear(1024, 10)

    def forward(self, x):
        w = F.batch_norm(self.conv.weight.reshape(1, 1024, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.conv.weight)  # as timm writes it
        return self.fc(F.conv2d(x, w, self.conv.bias).mean((2, 3)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_weight_standardised_at_every_call_is_folded_into_the_weight_it_computes(dynamo, tmp_path):
    # TorchScript writes BatchNormalization in training mode on the weight, dynamo ReduceMean/Sub/Div: onnx2torch
    # converted neither (KeyError, or "BatchNorm operation with mean/var output is not implemented")
    path = tmp_path / "std.onnx"
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("N", min=1, max=64)},)} if dynamo else \
        {"dynamic_axes": {"input": {0: "N"}}}
    torch.onnx.export(_StandardisedConv().eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=dynamo,
                      input_names=["input"], **kwargs)
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert conv.input[1] not in {t.name for t in model.graph.initializer}

    result = import_onnx(path, tmp_path / "imported")

    assert any(c.startswith("folded 1 convolution weight(s) computed from stored tensors") for c in result.changes)
    assert result.parity_max_rel <= 1e-4  # against onnxruntime running the standardisation on the source file
    folded = onnx.load(str(result.normalized_path))
    assert [n.op_type for n in folded.graph.node if n.op_type != "Constant"] == ["Conv", "ReduceMean", "Gemm"]
    r = _run(["compress", str(path), *TINY, "--no-prefect", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["sparsity"] >= 0.9 - 1e-3


class _InputScaledConv(nn.Module):
    """A convolution whose weight depends on the image (a dynamic filter): no stored tensor holds it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.conv2d(x, self.conv.weight * x.mean(), self.conv.bias).mean((2, 3)))


def test_a_weight_computed_from_the_input_is_refused_naming_the_node_and_what_to_do(tmp_path):
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(_InputScaledConv().eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=True,
                      input_names=["input"], dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")

    r = _run(["compress", str(path), *TINY, "--no-prefect"], tmp_path)

    assert r.returncode == 2, r.stderr[-2000:]  # found by the import stage, which leaves nothing behind
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: Conv at node '{conv.name}' takes its weight from the computed tensor '{conv.input[1]}', which "
        "depends on the model's input (a dynamic filter), not from a stored initializer; force-compress prunes "
        "stored weights: export the model with fixed convolution weights")


def test_the_losses_of_a_softmax_output_equal_cross_entropy_of_its_logits():
    z, y = torch.randn(16, 10), torch.randint(0, 10, (16,))

    assert torch.allclose(LOSSES["softmax"](z.softmax(1), y), F.cross_entropy(z, y), atol=1e-5)
    assert torch.allclose(LOSSES["log_softmax"](z.log_softmax(1), y, reduction="sum"),
                          F.cross_entropy(z, y, reduction="sum"), atol=1e-4)


def test_a_softmax_output_is_warned_about_and_trains_above_chance(tmp_path, to_onnx):
    from conftest import _tiny_cnn

    torch.manual_seed(0)
    path = to_onnx(nn.Sequential(_tiny_cnn(), nn.Softmax(dim=1)), tmp_path / "softmax.onnx")
    assert import_onnx(path, tmp_path).output_kind == "softmax"

    r = _run(["compress", path, *TINY, "--sparsity", "0.5", "--epochs", "3", "--no-prefect", "--json"], tmp_path)

    assert r.returncode in (0, 1), r.stderr[-2000:]
    warnings = [ln for ln in r.stderr.splitlines() if "the model's output is a softmax" in ln]
    assert len(warnings) == 1 and "nll_loss" in warnings[0]
    assert json.loads(r.stdout)["top1"] > 0.3  # chance is 0.1


class _PoisonedEval(nn.Module):
    """Finite in training; NaN in eval mode once `poison` is set (not state: the checkpoint loads as usual)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
        self.poison = False

    def forward(self, x):
        out = self.net(x)
        return out * float("nan") if self.poison and not self.training else out


def test_a_non_finite_validation_loss_stops_training_keeping_the_last_finite_checkpoint(tmp_path):
    splits = load_data("digits", (1, 8, 8), num_classes=10, augment=False)
    config = make_config(model="tiny.onnx", epochs=2, batch_size=128, lr=0.05, device="cpu", seed=0)
    module = _PoisonedEval()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in module.named_parameters() if p.dim() > 1}
    train_module(module, masks, splits, config, tmp_path, progress=False, max_epochs_this_call=1, plot=False)

    module.poison = True
    with pytest.raises(TrainingDivergedError) as e:
        train_module(module, masks, splits, config, tmp_path, progress=False, plot=False)

    assert e.value.exit_code == 1 and "\n" not in str(e.value)
    assert "validation loss became nan in epoch 2 of 2" in str(e.value)
    assert torch.load(tmp_path / RunFiles.CHECKPOINT, weights_only=False)["epoch"] == 1


def test_the_channel_floor_message_names_real_options():
    e = ChannelFloorError("force_core's words", multiple=8, reachable=0.9077, sparsity=0.95, floor=178, total=1928)

    line = _floor_message(e, "prunable weights")

    assert "min_keep" not in line and "--channel-multiple 8" in line and "--sparsity 0.95" in line
    assert "largest reachable sparsity is 0.9077" in line and "178 of the 1,928 prunable weights" in line
    nothing = _floor_message(ChannelFloorError("x", multiple=64), "prunable weights")
    assert "min_keep" not in nothing and "smaller --channel-multiple" in nothing
