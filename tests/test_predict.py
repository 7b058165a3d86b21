"""A published model used on its own (issue 14): the preprocessing and labels of training travel in the ONNX file's
metadata_props and the manifest, and `force-compress predict` on the user's own image files gives exactly
validation's predictions. Real parts: `compress` and `predict` in subprocesses, PNG files, onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.preprocessing import LABELS_KEY, PREPROCESSING_KEY

TINY = ["--sparsity", "0.9", "--epochs", "2", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
        "--min-accuracy", "0.15", "--no-prefect"]
CLASSES = {"frog": (40, 200, 60), "cat": (220, 60, 40), "dog": (50, 70, 230)}  # made in this order, sorted on load


def _cli(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).parent / "force-compress"  # the installed command users run
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _compress(model, cwd, *extra) -> tuple[Path, dict]:
    r = _cli("compress", model, *TINY, *extra, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    version = cwd / json.loads(r.stdout)["registry_path"]
    return version, json.loads((version / "manifest.json").read_text())


def _metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _held_out_digits():
    """The held-out split exactly as validation loads it, and the original 8x8 images behind it (grey levels
    0..16, as scikit-learn ships them) with their labels."""
    import torch
    from sklearn.datasets import load_digits

    from pipeline.data import load_data, split_indices

    splits = load_data("digits", (1, 8, 8), num_classes=10, val_fraction=0.1, seed=0, augment=False)
    d = load_digits()
    _, va = split_indices(torch.from_numpy(d.target), 0.1, 0)
    levels, y = d.images[va.numpy()], d.target[va.numpy()]
    assert np.array_equal(splits.val.x[:, 0].numpy(), (levels / 16.0).astype(np.float32))  # the same split
    return splits, levels, y


@pytest.fixture(scope="module")
def digits_version(tiny_at_init, tmp_path_factory):
    """`compress` of the tiny digits CNN, and the held-out images written as a user has them: 8-bit PNGs
    (grey level × 255/16) and, for the exact check, .npy arrays of the levels scaled to [0, 1]."""
    from PIL import Image

    work = tmp_path_factory.mktemp("digits")
    version, manifest = _compress(tiny_at_init, work)
    splits, levels, y = _held_out_digits()
    images = work / "images"
    images.mkdir()
    for i, img in enumerate(levels):
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), mode="L").save(images / f"{i:03d}.png")
        np.save(images / f"{i:03d}.npy", (img / 16.0).astype(np.float32))
    return work, version, manifest, splits, y


def test_predict_on_held_out_pngs_reaches_exactly_validations_top1(digits_version):
    work, version, manifest, splits, y = digits_version
    pngs = sorted((work / "images").glob("*.png"))
    npys = sorted((work / "images").glob("*.npy"))

    r = _cli("predict", version.relative_to(work), *[p.relative_to(work) for p in pngs + npys], "--json", cwd=work)

    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert [o["image"] for o in out] == [str(p.relative_to(work)) for p in pngs + npys]
    png, npy = out[: len(pngs)], out[len(pngs):]
    assert len(png) == len(y) == manifest["figures"]["n_val"]
    correct = sum(o["top"][0]["label"] == str(label) for o, label in zip(png, y, strict=True))
    assert correct / len(y) == pytest.approx(manifest["figures"]["top1"], abs=1e-12)
    # The .npy arrays hold validation's own [0, 1] images: every prediction is validation's, image by image.
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = splits.val.batch(torch.arange(len(splits.val)))
    want = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)
    assert [o["top"][0]["index"] for o in npy] == want.tolist()
    for o in out:
        top = o["top"]
        assert len(top) == 5 and top[0]["label"] == str(top[0]["index"])
        assert all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:], strict=False))
        assert 0 < sum(t["probability"] for t in top) <= 1 + 1e-9


def test_the_file_and_the_manifest_carry_preprocessing_and_labels(digits_version):
    _, version, manifest, splits, _ = digits_version
    meta = _metadata(version / "model.onnx")
    prep, labels = json.loads(meta[PREPROCESSING_KEY]), json.loads(meta[LABELS_KEY])

    assert labels == [str(i) for i in range(10)] == manifest["labels"]
    assert prep == manifest["preprocessing"]
    assert prep["layout"] == "NCHW" and prep["input_size"] == [1, 8, 8] and prep["colour"] == "grayscale"
    assert prep["mean"] == list(splits.mean) and prep["std"] == list(splits.std)  # the training split's, exactly
    assert prep["value_range"] == [0.0, 1.0] and prep["scale"] == "grey levels 0..16 / 16"
    assert prep["resize"]["library"] == "torch" and prep["resize"]["method"] == "bilinear"
    for form in ("model.compact.onnx",):  # every form of the version is derived from the exported file
        if (version / form).exists():
            assert _metadata(version / form)[PREPROCESSING_KEY] == meta[PREPROCESSING_KEY]


def test_int8_quantization_keeps_the_metadata(digits_version, tmp_path):
    import torch

    from stages.quantize import quantize_int8

    work, version, _, splits, _ = digits_version
    x, _ = splits.train_plain.batch(torch.arange(64))
    quantize_int8(version / "model.onnx", tmp_path / "model.int8.onnx", x.numpy())
    meta, int8 = _metadata(version / "model.onnx"), _metadata(tmp_path / "model.int8.onnx")
    assert int8[PREPROCESSING_KEY] == meta[PREPROCESSING_KEY] and int8[LABELS_KEY] == meta[LABELS_KEY]

    image = str(work / "images" / "000.png")
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "model.int8.onnx"), image, "--top", "3"])
    assert r.exit_code == 0, r.output
    line, = r.stdout.strip().splitlines()  # one line per image: path, then label probability, most probable first
    assert line.startswith(image + ": ") and line.count(",") == 2


def _bad(work: Path, tiny_at_init: str) -> dict[str, tuple[list[str], str]]:
    (work / "notes.png").write_text("not an image")
    version = work / "registry" / "tiny" / "v1"
    image = str(work / "images" / "000.png")
    return {
        "no metadata": ([tiny_at_init, image], "carries no preprocessing"),
        "missing image": ([str(version), str(work / "images" / "nope.png")], "image not found"),
        "unreadable image": ([str(version), str(work / "notes.png")], "not a readable image"),
        "missing model": ([str(work / "registry" / "tiny" / "v9"), image], "model not found"),
    }


@pytest.mark.parametrize("case", ["no metadata", "missing image", "unreadable image", "missing model"])
def test_bad_input_exits_2_with_one_line(case, digits_version, tiny_at_init):
    args, message = _bad(digits_version[0], tiny_at_init)[case]

    r = CliRunner().invoke(main, ["predict", *args, "--json"])

    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert json.loads(r.stdout) == {"exit_code": 2, "error": "bad_input", "message": lines[0][len("error: "):],
                                    "run_dir": None}  # --json answers failures too


def test_a_model_without_metadata_in_a_real_subprocess(tiny_at_init, digits_version):
    work = digits_version[0]
    r = _cli("predict", tiny_at_init, work / "images" / "000.png", cwd=work)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and PREPROCESSING_KEY in r.stderr


def _tiny_rgb_cnn(classes: int):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, classes))


def test_imagefolder_labels_are_the_sorted_folder_names_and_predict_matches_validation(tmp_path):
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for split, n in (("train", 40), ("val", 8)):
        for name, colour in CLASSES.items():  # frog, cat, dog: not the sorted order
            (root / split / name).mkdir(parents=True)
            for i in range(n):  # 12x12 RGB, resized to the model's 8x8 by Pillow on the way in
                img = np.clip(np.array(colour) + rng.normal(0, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img, mode="RGB").save(root / split / name / f"{i}.png")
    torch.manual_seed(0)
    model = _tiny_rgb_cnn(len(CLASSES)).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "pets.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})

    version, manifest = _compress(tmp_path / "pets.onnx", tmp_path, "--data", f"imagefolder:{root}", "--epochs", "8",
                                  "--sparsity", "0.5")
    files = sorted((root / "val").glob("*/*.png"))
    arrays = [tmp_path / f"{f.parent.name}.npy" for f in files[::8]]  # one per class: its pixels as an 8-bit array
    for f, a in zip(files[::8], arrays, strict=True):
        np.save(a, np.asarray(Image.open(f)))
    r = _cli("predict", version, *files, *arrays, "--json", "--top", "2", cwd=tmp_path)

    assert r.returncode == 0, r.stderr[-3000:]
    labels = json.loads(_metadata(version / "model.onnx")[LABELS_KEY])
    assert labels == ["cat", "dog", "frog"] == manifest["labels"]
    prep = manifest["preprocessing"]
    assert prep["input_size"] == [3, 8, 8] and prep["colour"] == "RGB" and prep["resize"]["library"] == "pillow"
    out = json.loads(r.stdout)
    out, from_arrays = out[: len(files)], out[len(files):]
    assert [o["top"] for o in from_arrays] == [o["top"] for o in out[::8]]  # the same pixels, the same Pillow path
    assert all(len(o["top"]) == 2 and o["top"][0]["label"] == labels[o["top"][0]["index"]] for o in out)
    accuracy = np.mean([o["top"][0]["label"] == Path(o["image"]).parent.name for o in out])
    assert accuracy == pytest.approx(manifest["figures"]["top1"], abs=1e-12)
    assert accuracy > 0.9  # colours this far apart: a wrong label order could not score this
