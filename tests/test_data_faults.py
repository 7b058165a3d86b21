"""Bad data fails early with one line (DataError, exit 2) instead of being trained on, decoded wrongly or published:
empty class folders, more classes than outputs, a single class, Pillow modes deeper than 8 bits, decompression
bombs, NaN/Inf and out-of-range npz pixels, labels of any dtype. Real files written into tmp_path."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data as data
from pipeline.data import load_data, read_image
from pipeline.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_images import write_folder, write_shards  # noqa: E402
from test_cli_contract import TINY, _one_line, _run  # noqa: E402

SHAPE = (1, 8, 8)


def _refused(spec: str, message: str, shape=SHAPE, num_classes: int = 10, **kw) -> str:
    with pytest.raises(DataError, match=message) as e:
        load_data(spec, shape, num_classes=num_classes, workers=0, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


# ------------------------------------------------------------------------------------------- classes


def test_an_empty_class_folder_is_named_not_counted_as_a_class(tmp_path):
    images = write_folder(tmp_path / "images", 40, size=8)
    (images / "zebra").mkdir()
    (images / "zebra" / "notes.txt").write_text("no image here")

    _refused(f"imagefolder:{images}", r"class folder 'zebra' holds no images \(.*\); remove it or add images")


@pytest.mark.parametrize("source", ["imagefolder", "webdataset", "npz"])
def test_more_classes_than_outputs_names_both_counts(source, tmp_path):
    images = write_folder(tmp_path / "images", 44, classes=11, size=8)
    spec = {"imagefolder": lambda: f"imagefolder:{images}",
            "webdataset": lambda: f"webdataset:{write_shards(images, tmp_path / 'shards', per_shard=20)}",
            "npz": lambda: _npz(tmp_path / "d.npz", x=np.zeros((44, 8, 8), np.uint8), y=np.arange(44) % 11)}[source]()

    line = _refused(spec, r"has 11 classes: label 10 but the model has 10 outputs")
    assert "use a model with 11 outputs or leave out class(es) " in line


def test_npz_class_names_beyond_the_outputs_are_refused(tmp_path):
    spec = _npz(tmp_path / "d.npz", x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2,
                class_names=np.array(list("abc")))
    _refused(spec, r"has 3 classes but the model has 2 outputs .* leave out class\(es\) 'c'$", num_classes=2)


@pytest.mark.parametrize("source", ["imagefolder", "webdataset", "npz"])
def test_a_single_class_is_refused(source, tmp_path):
    images = write_folder(tmp_path / "images", 12, classes=1, size=8)
    spec = {"imagefolder": lambda: f"imagefolder:{images}",
            "webdataset": lambda: f"webdataset:{write_shards(images, tmp_path / 'shards')}",
            "npz": lambda: _npz(tmp_path / "d.npz", x=np.zeros((12, 8, 8), np.uint8), y=np.full(12, 3))}[source]()

    _refused(spec, r"holds only one class \('(class00|0|3)'\) in its 12 images: a classifier needs at least two")


# --------------------------------------------------------------------------------------- Pillow modes

_RAMP = np.arange(16).reshape(4, 4)  # the 8-bit values every deep image below must decode to: 0, 17, ..., 255
_GREY = (_RAMP * 17).astype(np.uint8)


def _deep(mode: str) -> Image.Image:
    """A 4x4 ramp stored at `mode`'s depth, in the range the docstring of to_8bit says maps to 0..255."""
    k = _RAMP.astype(np.float64) / 15
    if mode in ("I;16", "I;16B"):
        return Image.frombytes(mode, (4, 4), np.rint(k * 65535).astype("<u2" if mode == "I;16" else ">u2").tobytes())
    if mode == "I":
        return Image.fromarray(np.rint(k * 65535).astype(np.int32))
    if mode == "I big":
        return Image.fromarray(np.rint(k * 3_000_000).astype(np.int32))  # beyond 16 bits: scaled by its max
    if mode == "F":
        return Image.fromarray(k.astype(np.float32))  # fractions
    return Image.fromarray((k * 255).astype(np.float32))  # "F 0..255"


@pytest.mark.parametrize("mode, ext", [("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I", "tif"),
                                       ("I big", "tif"), ("F", "tif"), ("F 0..255", "tif")])
def test_deep_images_decode_to_the_matching_8_bit_values(mode, ext, tmp_path):
    path = tmp_path / f"deep.{ext}"
    _deep(mode).save(path)
    assert Image.open(path).mode == mode.split()[0]

    np.testing.assert_array_equal(read_image(path, "L", (4, 4)), _GREY)
    np.testing.assert_array_equal(read_image(path, "RGB", (4, 4)), np.repeat(_GREY[..., None], 3, axis=2))


def test_float_images_outside_0_255_are_clipped(tmp_path):
    Image.fromarray(np.array([[-5.0, 0.0], [128.0, 300.0]], np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif", "L", (2, 2)), [[0, 0], [128, 255]])


def _palette(transparent: bool) -> Image.Image:
    im = Image.new("P", (2, 2))
    im.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0])
    im.putdata([0, 1, 2, 1])
    if transparent:  # per palette entry, as PNG's tRNS stores it: what makes Pillow warn on convert("RGB")
        im.info["transparency"] = bytes([0, 255, 128])
    return im


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "P transparent", "RGB", "RGBA", "CMYK"])
def test_8_bit_modes_decode_as_pillow_converts_them_alpha_dropped(mode, tmp_path):
    rgb = np.array([[[10, 20, 30], [200, 0, 0]], [[0, 200, 0], [200, 0, 0]]], np.uint8)
    grey = np.array([[0, 255], [255, 0]], np.uint8)
    if mode == "1":
        im, want = Image.fromarray(grey).convert("1"), np.repeat(grey[..., None], 3, axis=2)
    elif mode in ("L", "LA"):
        im, want = Image.fromarray(grey), np.repeat(grey[..., None], 3, axis=2)
        im = im if mode == "L" else Image.merge("LA", (im, Image.new("L", (2, 2), 7)))
    elif mode.startswith("P"):
        im, want = _palette(mode == "P transparent"), rgb
    elif mode == "CMYK":  # cyan, magenta, yellow, black
        cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0]], [[0, 0, 255, 0], [0, 0, 0, 255]]], np.uint8)
        im, want = Image.frombytes("CMYK", (2, 2), cmyk.tobytes()), np.array(
            [[[0, 255, 255], [255, 0, 255]], [[255, 255, 0], [0, 0, 0]]], np.uint8)
    else:
        im, want = Image.fromarray(rgb), rgb
        im = im if mode == "RGB" else Image.merge("RGBA", (*im.split(), Image.new("L", (2, 2), 0)))
    path = tmp_path / ("im.tif" if mode == "CMYK" else "im.png")
    im.save(path)
    assert Image.open(path).mode == mode.split()[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a palette with transparency bytes must not make Pillow warn
        got = read_image(path, "RGB", (2, 2))
    np.testing.assert_array_equal(got, want)


def test_a_folder_of_16_bit_pngs_is_not_decoded_white(tmp_path):
    for c in ("dark", "light"):
        (tmp_path / c).mkdir()
        for i in range(5):
            _deep("I;16").save(tmp_path / c / f"{i}.png")

    s = load_data(f"imagefolder:{tmp_path}", (1, 4, 4), num_classes=2, augment=False, workers=0)

    torch.testing.assert_close(s.val.x[0, 0], torch.from_numpy(_GREY).float() / 255)


# ------------------------------------------------------------------------------------ decompression bombs


def test_an_image_over_max_image_pixels_is_skipped_and_named_with_the_reason(tmp_path, monkeypatch):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("L", (6, 6), 40 * i % 256).save(tmp_path / c / f"{i}.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "b" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 6x6 passes; 8x8 warns (but is under PIL's 2x error)

    with pytest.raises(Image.DecompressionBombWarning):
        read_image(tmp_path / "b" / "bomb.png", "L", (8, 8))
    _refused(f"imagefolder:{tmp_path}", r"1 of the 21 images are unreadable .*: b/bomb\.png;", num_classes=2)
    for memory_mb in (512, 0):  # decoded into memory, and streamed
        s = load_data(f"imagefolder:{tmp_path}", SHAPE, num_classes=2, max_bad_fraction=0.2, workers=0,
                      memory_mb=memory_mb)
        for ds in (s.train_plain, s.val):  # a streamed set meets the bomb only when it is read
            list(ds.batches([range(len(ds))]))
        first = s.bad.summary()["first"]
        assert [f["image"] for f in first] == ["b/bomb.png"], first
        assert first[0]["error"].startswith("DecompressionBombWarning: Image size (64 pixels) exceeds limit of 50")


# ------------------------------------------------------------------------------------------------ npz


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.where(np.arange(20)[:, None, None] == 3, np.nan, np.zeros((20, 8, 8), np.float32))},
     r"x holds 64 NaN or infinite value\(s\) \(first in image 3\); replace them or drop those images"),
    ({"x": np.pad(np.full((1, 8, 8), np.inf, np.float32), ((7, 12), (0, 0), (0, 0)))},
     r"x holds 64 NaN or infinite value\(s\) \(first in image 7\)"),
    ({"x": np.linspace(-1, 1, 20 * 64, dtype=np.float32).reshape(20, 8, 8)},
     r"x holds values from -1 to 1; store images unnormalised, as 0\.\.255 or as floats in \[0, 1\]"),
    ({"x": np.full((20, 8, 8), 1.2, np.float32)}, r"x holds values from 1\.2 to 1\.2; store images unnormalised"),
    ({"x": np.full((20, 8, 8), 65535, np.uint16)}, r"x holds values from 65535 to 65535"),
    ({"x": np.zeros((20, 8, 8), bool)}, r"x has dtype bool; expected uint8 or float"),
    ({"y": np.r_[np.arange(19) % 2, 0.5]}, r"y holds 1 label\(s\) that are not whole numbers \(first 0\.5, image 19\)"),
    ({"y": np.r_[np.arange(19) % 2, np.nan]}, r"y holds 1 label\(s\) that are not whole numbers \(first nan, image 19"),
    ({"y": np.array(["cat", "dog"] * 10)}, r"y holds values of dtype <U3; store integer class indices 0\.\.K-1"),
    ({"y": np.array([{"a": 1}] * 20, dtype=object)}, r"cannot read npz file .*allow_pickle"),
    ({"y": np.arange(20) % 2 == 0}, r"y holds booleans; store integer class indices"),
    ({"y": np.arange(20) % 3 - 1}, r"has negative label -1; labels must be class indices 0\.\.9"),
    ({"y": np.zeros((20, 2))}, r"y has shape \(20, 2\); expected one integer label for each of the 20 images"),
    ({"y": np.arange(20) % 4, "class_names": np.array(["a", "b"])},
     r"class_names has 2 names but the labels go up to 3; name every class"),
], ids=["nan", "inf", "normalised", "above 1", "uint16", "bool x", "y 0.5", "y nan", "y strings", "y objects",
        "y bool", "y negative", "y one-hot", "short class_names"])
def test_npz_faults_are_one_line(arrays, message, tmp_path):
    arrays = {"x": np.zeros((20, 8, 8), np.uint8), "y": np.arange(20) % 2, **arrays}
    _refused(_npz(tmp_path / "d.npz", **arrays), message)


def test_npz_whole_float_labels_and_float_pixels_0_255_are_accepted(tmp_path):
    x = (np.arange(20 * 64) % 256).reshape(20, 8, 8).astype(np.float64)
    s = load_data(_npz(tmp_path / "d.npz", x=x, y=(np.arange(20) % 2).astype(np.float32)), SHAPE, num_classes=2,
                  augment=False)
    held = torch.cat([s.train.x, s.val.x])
    assert held.dtype == torch.float32 and float(held.max()) == 1.0 and float(held.min()) == 0.0
    assert sorted(torch.cat([s.train.y, s.val.y]).tolist()) == [0] * 10 + [1] * 10


# --------------------------------------------------------------------------------- decoded pixel values


@pytest.mark.parametrize("fill, message", [
    (float("nan"), r"holds 16 NaN or infinite value\(s\) \(first in image 2\)"),
    (1.5, r"holds pixel values from 0 to 1\.5 after decoding, outside \[0, 1\]"),
])
def test_a_source_handing_back_bad_pixels_is_refused(fill, message):
    @data.register_source("faulty")
    def _faulty(arg, shape, geometry):
        x = torch.zeros(10, *shape)
        x[2] = fill
        return data.RawData(x, torch.arange(10) % 2, ("a", "b"))

    try:
        _refused("faulty", r"data 'faulty' " + message, shape=(1, 4, 4), num_classes=2)
    finally:
        data._SOURCES.pop("faulty")


# -------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("case", ["empty class folder", "nan pixels"])
def test_bad_data_exits_2_with_one_line_and_leaves_nothing(case, tiny_at_init, tmp_path):
    if case == "empty class folder":
        images = write_folder(tmp_path / "images", 40, size=8)
        (images / "zebra").mkdir()
        spec, message = f"imagefolder:{images}", "class folder 'zebra' holds no images"
    else:
        x = np.zeros((20, 8, 8), np.float32)
        x[5, 0, 0] = np.nan
        spec, message = _npz(tmp_path / "d.npz", x=x, y=np.arange(20) % 10), "(first in image 5)"
    work = tmp_path / "work"
    work.mkdir()

    r = _run(["compress", tiny_at_init, "--data", spec, *TINY, "--no-prefect"], work)

    assert r.returncode == 2, r.stderr[-2000:]
    assert message in _one_line(r)
    for left in ("runs", "registry"):
        assert not (work / left).exists() or not any((work / left).rglob("*")), left
