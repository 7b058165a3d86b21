"""The input's own preprocessing: resize and centre crop as torchvision's ImageNet transforms make them, for the data
the run opens, for `predict`, and as recorded in the published file; and bad statements refused at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.models import ResNet50_Weights

from pipeline.cli import main
from pipeline.config import make_config
from pipeline.data import load_data
from pipeline.errors import BadInputError
from pipeline.geometry import Geometry
from pipeline.preprocessing import PREPROCESSING_KEY, PRESETS, Preprocessing, load_image, resolve

# (width, height): landscape, portrait, square, a shorter side under 256 (upscaled), a panorama, an odd size
SIZES = [(400, 300), (260, 500), (256, 256), (240, 180), (640, 200), (333, 517)]
IMAGENET = PRESETS["imagenet"]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Real JPEG files of several sizes and aspect ratios (smooth gradients with noise, as photographs have), laid
    out as an image folder whose val/ holds every file in sorted order."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        a = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        for split in ("train", "val"):
            d = root / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(d / f"img{i}.jpg", quality=90)
        files.append(root / "val" / f"c{i % 2}" / f"img{i}.jpg")
    order = sorted(files, key=lambda f: (f.parent.name, f.name))  # the folder source's order
    return root, order


def _torchvision(files) -> torch.Tensor:
    """What torchvision's ResNet50 ImageNet weights expect, un-normalised back to [0, 1]."""
    t = ResNet50_Weights.IMAGENET1K_V1.transforms()
    mean, std = torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(t(im) * std + mean)
    return torch.stack(out)


def test_the_imagenet_preset_is_torchvisions_resnet50_eval_transform(jpegs):
    root, files = jpegs
    expected = _torchvision(files)
    prep = resolve({"preprocessing": "imagenet"}, {}, 3, (224, 224))
    assert prep.geometry == Geometry((256,), (224, 224), "bilinear") and prep.mean == IMAGENET["mean"]

    splits = load_data(f"imagefolder:{root}", (3, 224, 224), num_classes=2, augment=False, mean=prep.mean,
                       std=prep.std, geometry=prep.geometry)
    x, _ = splits.val.batch(torch.arange(len(files)))
    got = x * splits.val.std + splits.val.mean
    assert got.shape == expected.shape == (len(SIZES), 3, 224, 224)
    diff = (got - expected).abs().max().item()
    print(f"imagefolder with --preprocessing imagenet vs torchvision ResNet50 transforms: max |diff| {diff:.2e}")
    assert diff <= 1 / 255

    record = Preprocessing((3, 224, 224), prep.mean, prep.std, ("c0", "c1"), "pillow", geometry=prep.geometry)
    record = Preprocessing.from_metadata(record.metadata_props())  # as a published file carries it
    assert record.geometry == prep.geometry
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    for f, want in zip(files, expected, strict=True):
        one = torch.from_numpy(load_image(f, record)) * std + mean  # predict's path
        assert (one - want).abs().max().item() <= 1 / 255, f


def test_resize_and_crop_also_apply_to_in_memory_sources():
    """digits (8x8) shorter side to 12, centre crop 10x10: what torchvision does to the same tensor."""
    from sklearn.datasets import load_digits
    from torchvision.transforms.v2 import functional as TF

    g = Geometry((12,), (10, 10), "bicubic")
    s = load_data("digits", (1, 10, 10), num_classes=10, augment=False, mean=(0.0,), std=(1.0,), val_fraction=0.5,
                  geometry=g)
    x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)
    want = TF.center_crop(TF.resize(x, [12], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [10, 10])
    all_x = torch.cat([s.train.x, s.val.x])
    assert all_x.shape[1:] == (1, 10, 10)
    # the split permutes images: compare the sorted per-image sums of both sets
    got_sums, want_sums = all_x.sum((1, 2, 3)).sort().values, want.clamp(0, 1).sum((1, 2, 3)).sort().values
    assert torch.allclose(got_sums, want_sums, atol=1e-3)


def test_options_win_over_the_preset_and_the_preset_over_the_files_record():
    record = Preprocessing((3, 200, 200), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (), "pillow",
                           geometry=Geometry((230,), (200, 200), "bicubic")).metadata_props()
    from_file = resolve({}, record, 3, (200, 200))
    assert from_file.geometry == Geometry((230,), (200, 200), "bicubic") and from_file.mean == (0.5,) * 3
    assert "metadata" in from_file.geometry_from and "metadata" in from_file.normalization
    preset = resolve({"preprocessing": "imagenet"}, record, 3, (224, 224))
    assert preset.geometry == Geometry((256,), (224, 224), "bilinear") and preset.normalization == "preset imagenet"
    mixed = resolve({"preprocessing": "imagenet", "resize": "232", "interpolation": "bicubic",
                     "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}, record, 3, (224, 224))
    assert mixed.geometry == Geometry((232,), (224, 224), "bicubic") and mixed.mean == (0.0,) * 3
    assert mixed.geometry_from == "the options and preset imagenet"


@pytest.mark.parametrize("options, message", [
    ({"preprocessing": "imagenett"}, "unknown preprocessing preset 'imagenett'; choose one of imagenet"),
    ({"resize": "200", "crop": "224"}, "the crop 224x224 is larger than the resize 200"),
    ({"resize": "256"}, "give --crop H[xW] as well"),
    ({"crop": "22x"}, "--crop '22x' is not a size"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "have 2 values but the input model's input has 3 channel(s)"),
])
def test_contradictions_are_bad_input(options, message):
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        resolve(options, {}, 3, (224, 224))


def test_a_crop_other_than_a_fixed_input_is_bad_input():
    with pytest.raises(BadInputError, match="produces 224x224 images but the input model's input is 32x32"):
        resolve({"preprocessing": "imagenet"}, {}, 3, (32, 32))
    with pytest.raises(BadInputError, match="describes 3 channel"):
        record = Preprocessing((3, 8, 8), (0.5,) * 3, (0.2,) * 3, ()).metadata_props()
        resolve({}, record, 1, (8, 8))


@pytest.mark.parametrize("args, message", [  # mean/std alone: tests/test_trained_input.py
    (["--resize", "20", "--crop", "24"], "the crop 24x24 is larger than the resize 20"),
    (["--preprocessing", "imagenett"], "unknown preprocessing preset 'imagenett'"),
    (["--resize", "12", "--crop", "10"], "produces 10x10 images but tiny.onnx's input is 8x8"),
    (["--preprocessing", "imagenet"], "mean/std from preset imagenet have 3 values but tiny.onnx's input has 1"),
])
def test_the_cli_refuses_them_with_exit_2_and_one_line_before_any_work(tiny_at_init, tmp_path, args, message):
    r = CliRunner().invoke(main, ["compress", tiny_at_init, "--no-prefect", "--runs-dir", str(tmp_path / "runs"),
                                  "--registry", str(tmp_path / "reg"), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reg").exists()


def test_the_config_records_the_preset_and_reads_back_the_same():
    c = make_config(model="m.onnx", preprocessing="imagenet", crop="224x224")
    assert c.preprocessing_options()["crop"] == "224x224"
    prep = Preprocessing((3, 224, 224), IMAGENET["mean"], IMAGENET["std"], (), "pillow",
                         geometry=Geometry((256,), (224, 224)), geometry_from="preset imagenet")
    d = json.loads(prep.metadata_props()[PREPROCESSING_KEY])
    assert d["geometry"]["resize"] == [256] and d["geometry"]["crop"] == [224, 224] and d["format"] == 2
    assert d["geometry"]["from"] == "preset imagenet"
