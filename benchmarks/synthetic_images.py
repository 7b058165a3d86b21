"""Synthetic image sets on disk, as users keep them: a class-per-folder tree of JPEGs and the same images as
WebDataset tar shards (written with the webdataset library's TarWriter). Each class has its own colour and stripe
direction under noise, so a small network learns it above chance; nothing is downloaded. Used by
benchmarks/bench_data.py and the tests."""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.float32)


def image(label: int, index: int, size: int, seed: int = 0) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `label` (its colour and stripes, noise drawn from `index`)."""
    rng = np.random.default_rng((seed, label, index))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.pi * (label % 5) / 5
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
    colour = _PALETTE[label % len(_PALETTE)]
    img = stripes[..., None] * colour + rng.normal(0, 40, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(a: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_chunk(args) -> None:
    root, items, size, seed = args
    for label, index in items:
        path = Path(root) / f"class{label:02d}" / f"{index:06d}.jpg"
        path.write_bytes(jpeg(image(label, index, size, seed)))


def write_folder(root: str | os.PathLike, n: int, *, classes: int = 10, size: int = 224, seed: int = 0,
                 jobs: int | None = None) -> Path:
    """`n` JPEGs of `classes` classes at size×size in root/classNN/ (image i has class i % classes); returns root.
    An existing folder with a complete marker is kept."""
    root = Path(root)
    marker = root / f".complete-{n}-{classes}-{size}-{seed}"
    if marker.exists():
        return root
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    items = [(i % classes, i) for i in range(n)]
    jobs = jobs or os.cpu_count() or 1
    chunks = [(str(root), items[k::jobs * 4], size, seed) for k in range(jobs * 4)]
    if jobs > 1 and n > 200:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_write_chunk, chunks))
    else:
        for chunk in chunks:
            _write_chunk(chunk)
    marker.touch()
    return root


def write_shards(folder: str | os.PathLike, out: str | os.PathLike, *, per_shard: int = 1000) -> str:
    """The JPEGs of a class-per-folder tree as WebDataset shards out/shard-NNNNNN.tar (KEY.jpg + KEY.cls, samples
    in a seeded shuffled order, as shards are written for training); returns the brace pattern naming them."""
    import webdataset as wds

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).glob("*.jpg"))]
    order = np.random.default_rng(0).permutation(len(files))
    n_shards = (len(files) + per_shard - 1) // per_shard
    marker = out / f".complete-{len(files)}-{per_shard}"
    if not marker.exists():
        for s in range(n_shards):
            with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as sink:
                for k in order[s * per_shard:(s + 1) * per_shard]:
                    f, c = files[k]
                    sink.write({"__key__": f"{f.parent.name}_{f.stem}", "jpg": f.read_bytes(), "cls": c})
        marker.touch()
    return str(out / f"shard-{{{0:06d}..{n_shards - 1:06d}}}.tar")
