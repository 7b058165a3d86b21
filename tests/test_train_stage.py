"""The sparse_train stage on a real ONNX file: import → masks → sparse-train, files in, files out."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from pipeline.config import make_config
from pipeline.data import load_data, mask_batches
from pipeline.errors import DataError
from stages.compute_masks import compute_masks_stage
from stages.import_onnx import import_onnx
from stages.onnx_convert.mask_file import load_masks
from stages.onnx_convert.to_torch import load_module
from stages.sparse_train.training import model_io, sparse_train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.onnx's legacy exporter


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    torch.onnx.export(net, torch.zeros(1, 3, 8, 8), d / "tiny.onnx", input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    imp = import_onnx(d / "tiny.onnx", d)
    splits = load_data("digits", imp.input_shape, num_classes=imp.num_classes, seed=0)
    masks = compute_masks_stage(imp.normalized_path, d / "masks.npz", method="snip", density=0.2,
                                batches=mask_batches(splits, 64, 1, seed=0), seed=0)
    return d, imp, masks


def test_stage_trains_the_imported_module_with_masks_exact(imported, tmp_path):
    d, imp, masks = imported
    config = make_config(model=str(d / "tiny.onnx"), epochs=2, batch_size=128, device="cpu")
    part = sparse_train(imp.normalized_path, masks.masks_path, config, tmp_path, progress=False,
                        max_epochs_this_call=1)
    assert not part.completed
    res = sparse_train(imp.normalized_path, masks.masks_path, config, tmp_path, progress=False)
    assert res.completed and res.resumed_from_epoch == 1 and res.epochs == 2
    module, pmap = load_module(imp.normalized_path)
    maskset = load_masks(masks.masks_path, pmap)
    state = torch.load(res.state_path, map_location="cpu", weights_only=True)
    assert state.keys() == module.state_dict().keys()
    for name, m in maskset.items():
        assert torch.count_nonzero(state[name][~m]) == 0
    assert abs(res.density - masks.density) < 1e-9
    summary = json.loads((tmp_path / "train_result.json").read_text())
    assert summary["val_acc"] == res.val_acc and len(summary["mean"]) == 3
    assert model_io(imp.normalized_path) == ((3, 8, 8), 10)


def test_stage_refuses_data_with_more_classes_than_outputs(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), tmp_path / "four.onnx", opset_version=17, dynamo=False)
    imp = import_onnx(tmp_path / "four.onnx", tmp_path)
    masks = compute_masks_stage(imp.normalized_path, tmp_path / "m.npz", method="random", density=0.5)
    config = make_config(model=str(tmp_path / "four.onnx"), epochs=1, device="cpu")
    with pytest.raises(DataError, match="label 9 but the model has 4 outputs"):
        sparse_train(imp.normalized_path, masks.masks_path, config, tmp_path / "run", progress=False)
