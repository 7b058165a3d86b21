"""pipeline.data: specs, preprocessing from the model input, seeded split, augmentation, clear DataErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.data as data
from pipeline.data import (
    Augment,
    augment_batch,
    load_data,
    make_loader,
    mask_batches,
    register_source,
    split_indices,
)
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def digits16():
    return load_data("digits", (3, 16, 16), num_classes=10, seed=0)


def test_digits_resized_to_model_input_grey_to_rgb(digits16):
    s = digits16
    assert s.train.x.shape[1:] == (3, 16, 16) and s.val.x.shape[1:] == (3, 16, 16)
    assert torch.equal(s.train.x[:, 0], s.train.x[:, 2])  # grey repeated into 3 channels
    assert len(s.train) + len(s.val) == 1797 and abs(len(s.val) - 180) <= 10
    assert s.num_classes == 10 and s.class_names == tuple("0123456789")
    # mean/std come from the training split (of [0, 1] images); normalised train data is ~N(0, 1)
    x, _ = s.train_plain.batch(torch.arange(len(s.train_plain)))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    assert "digits" in s.source


def test_digits_augmentation_default_crop_without_flip_and_switchable(digits16):
    assert digits16.augment == Augment(pad=2, flip=False)  # a mirrored digit is another glyph
    on = load_data("digits", (1, 8, 8), num_classes=10, flip=True)
    assert on.augment.flip and on.augment.pad == 1
    off = load_data("digits", (1, 8, 8), num_classes=10, augment=False)
    assert not off.augment.active
    idx = torch.arange(32)
    assert torch.equal(off.train.batch(idx)[0], off.train_plain.batch(idx)[0])


def test_given_mean_std_are_used():
    s = load_data("digits", (1, 8, 8), num_classes=10, mean=(0.5,), std=(0.25,))
    assert s.mean == (0.5,) and s.std == (0.25,)
    x, _ = s.val.batch(torch.arange(4))
    assert torch.allclose(x, (s.val.x[:4] - 0.5) / 0.25)


def test_split_is_seeded_stratified_and_disjoint():
    y = torch.arange(200) % 4
    tr, va = split_indices(y, 0.1, seed=3)
    tr2, va2 = split_indices(y, 0.1, seed=3)
    _, va3 = split_indices(y, 0.1, seed=4)
    assert torch.equal(va, va2) and torch.equal(tr, tr2) and not torch.equal(va, va3)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 200
    assert torch.bincount(y[va]).tolist() == [5, 5, 5, 5]


def test_augment_batch_shifts_within_padding_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, Augment(pad=1, flip=False), g)
    assert out.shape == x.shape
    for i in range(2):  # the crop is x shifted by at most one pixel, zeros entering from the border
        inner = out[i, 0, 1:3, 1:3]
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.equal(inner, x[i, 0, 1 + dy : 3 + dy, 1 + dx : 3 + dx]) for dy, dx in shifts)
    flipped = augment_batch(x.repeat(16, 1, 1, 1), Augment(flip=True), torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(f, x[i % 2].flip(-1)) for i, f in enumerate(flipped))
    assert 0 < n_flipped < 32


def test_npz_nhwc_uint8_and_nchw_float(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 12, 12, 3), dtype=np.uint8)
    y = np.arange(40) % 5
    np.savez(tmp_path / "a.npz", x=x, y=y)
    s = load_data(f"npz:{tmp_path / 'a.npz'}", (3, 12, 12), num_classes=5, augment=False)
    all_x = torch.cat([s.train.x, s.val.x])
    assert all_x.shape == (40, 3, 12, 12) and float(all_x.max()) <= 1.0
    assert s.augment == Augment()  # augment off
    np.savez(tmp_path / "b.npz", x=x.transpose(0, 3, 1, 2).astype(np.float32) / 255, y=y)
    s2 = load_data(f"npz:{tmp_path / 'b.npz'}", (1, 6, 6), num_classes=5)  # RGB -> grey, resized down
    assert s2.train.x.shape[1:] == (1, 6, 6)
    assert torch.allclose(s2.train.x.mean(), s.train.x.mean(), atol=0.05)


def test_npz_fixed_validation_split(tmp_path):
    x = np.zeros((10, 8, 8), np.uint8)
    np.savez(tmp_path / "v.npz", x=x, y=np.arange(10) % 2, x_val=x[:4], y_val=np.array([0, 1, 0, 1]))
    s = load_data(f"npz:{tmp_path / 'v.npz'}", (1, 8, 8), num_classes=2)
    assert len(s.train) == 10 and len(s.val) == 4


@pytest.mark.parametrize(
    "arrays, shape, classes, message",
    [
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 2, 10])}, (1, 8, 8), 10, "label 10"),
        ({"x": np.zeros((4, 2, 8, 8), np.uint8), "y": np.zeros(4, int)}, (3, 8, 8), 10, "2 channels"),
        ({"x": np.zeros((4, 8, 8), np.uint8)}, (1, 8, 8), 10, "missing array 'y'"),
    ],
)
def test_npz_errors_are_one_clear_line(tmp_path, arrays, shape, classes, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as e:
        load_data(f"npz:{tmp_path / 'bad.npz'}", shape, num_classes=classes)
    assert "\n" not in str(e.value)


def _write_images(folder, n, size=10, color=(0, 0, 0)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), tuple((c + 20 * i) % 256 for c in color)).save(folder / f"{i}.png")


def test_imagefolder_classes_and_train_val_dirs(tmp_path):
    _write_images(tmp_path / "flat" / "cat", 6, color=(200, 0, 0))
    _write_images(tmp_path / "flat" / "dog", 6, color=(0, 0, 200))
    (tmp_path / "flat" / "dog" / "notes.txt").write_text("not an image; ignored")
    s = load_data(f"imagefolder:{tmp_path / 'flat'}", (3, 8, 8), num_classes=2)
    assert s.class_names == ("cat", "dog") and len(s.train) + len(s.val) == 12
    assert s.augment.flip  # photos flip by default
    for part, n in (("train", 4), ("val", 2)):
        _write_images(tmp_path / "split" / part / "a", n)
        _write_images(tmp_path / "split" / part / "b", n)
    s2 = load_data(f"imagefolder:{tmp_path / 'split'}", (1, 8, 8), num_classes=3)
    assert len(s2.train) == 8 and len(s2.val) == 4 and s2.train.x.shape[1:] == (1, 8, 8)


def test_imagefolder_unreadable_images_counted_and_refused_above_threshold(tmp_path, monkeypatch):
    _write_images(tmp_path / "a", 5)
    _write_images(tmp_path / "b", 5)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1 of the 11 images are unreadable .*broken\.png.*--max-bad-fraction"):
        load_data(f"imagefolder:{tmp_path}", (3, 8, 8), num_classes=2)
    s = load_data(f"imagefolder:{tmp_path}", (3, 8, 8), num_classes=2, max_bad_fraction=0.2)
    assert len(s.train) + len(s.val) == 10
    assert s.bad.summary()["unreadable"] == 1 and s.bad.summary()["first"][0]["image"] == "b/broken.png"


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'nope'}", (3, 8, 8), num_classes=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", (3, 8, 8), num_classes=2)
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", (3, 8, 8), num_classes=2)
    for c in "abc":
        _write_images(tmp_path / "three" / c, 2)
    with pytest.raises(DataError, match="label 2 but the model has 2 outputs"):
        load_data(f"imagefolder:{tmp_path / 'three'}", (3, 8, 8), num_classes=2)
    with pytest.raises(DataError, match="expects 2 channels"):
        load_data(f"imagefolder:{tmp_path / 'three'}", (2, 8, 8), num_classes=3)


@pytest.mark.parametrize("spec", ["", "mnist", "digits:extra", "npz:", "imagefolder:"])
def test_bad_specs(spec):
    with pytest.raises(DataError):
        load_data(spec, (1, 8, 8), num_classes=10)


def test_dynamic_input_and_too_few_outputs_refused():
    with pytest.raises(DataError, match="with --image-size H W"):
        load_data("digits", (1, None, None), num_classes=10)
    with pytest.raises(DataError, match="label 9 but the model has 5 outputs"):
        load_data("digits", (1, 8, 8), num_classes=5)


def test_register_source_extends_specs():
    @register_source("ones")
    def _ones(arg, shape, geometry):
        c, h, w = shape
        return data.RawData(torch.ones(int(arg or 20), c, h, w), torch.arange(int(arg or 20)) % 2, ("a", "b"))

    try:
        s = load_data("ones:30", (1, 4, 4), num_classes=2)
        assert len(s.train) + len(s.val) == 30 and "ones" in data.available_sources()
    finally:
        data._SOURCES.pop("ones")


def test_register_source_refuses_a_scheme_twice():
    def first(arg, shape, geometry):
        return data.RawData(torch.ones(4, *shape), torch.arange(4) % 2, ("a", "b"))

    def second(arg, shape, geometry):
        return data.RawData(torch.zeros(4, *shape), torch.arange(4) % 2, ("a", "b"))

    try:
        register_source("twice")(first)
        with pytest.raises(ValueError, match=r"scheme 'twice' is already registered \(by .*first\)"):
            register_source("twice")(second)
        register_source("twice")(first)  # the very same function: no change
        assert data._SOURCES["twice"] is first
        with pytest.raises(ValueError, match="scheme 'digits' is already registered"):
            register_source("digits")(second)
        assert data._SOURCES["digits"] is data._digits
    finally:
        data._SOURCES.pop("twice", None)


def test_mask_batches_are_seeded_fresh_draws(digits16):
    a = mask_batches(digits16, 64, 30, seed=1)
    b = mask_batches(digits16, 64, 30, seed=1)
    assert len(a) == 30 and a[0][0].shape == (64, 3, 16, 16)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not torch.equal(a[0][1], a[1][1])  # a new draw each batch, past the end of one pass too


def test_loader_shards_every_epoch_across_ranks(digits16):
    ds = digits16.val
    seen = []
    for rank in range(2):
        loader = make_loader(ds, 16, seed=5, rank=rank, world_size=2)
        loader.set_epoch(3)
        seen += [y for _, ys in loader for y in ys.tolist()]
    from collections import Counter

    missing = Counter(ds.y.tolist()) - Counter(seen)
    assert not missing and len(seen) - len(ds) < 2  # DistributedSampler pads to an even share
    one = make_loader(ds, 16, seed=5)
    one.set_epoch(3)
    assert sum(len(y) for _, y in one) == len(ds)
