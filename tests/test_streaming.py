"""Data at scale (issue 23): image folders and WebDataset shards are lists of files read by DataLoader workers batch
by batch; the held-out split is a file every later run reuses; unreadable images are skipped, counted and named, and
too many stop the run; `--max-steps` and `--val-images` bound the work of a CI step; under `--nproc 2` each rank
reads its own half of every epoch. Real JPEG folders and shards (benchmarks/synthetic_images.py), the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data import load_data, make_loader, mask_batches
from pipeline.errors import DataError
from pipeline.files import READ_LOG_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_images import write_folder, write_shards  # noqa: E402

BIN = Path(sys.executable).parent
STREAMED = ["--memory-mb", "0"]  # every test image set here is tiny: make it stream as a large one would
QUICK = ["--steps", "2", "--mask-batch-size", "32", "--batch-size", "32", "--recipe", "scratch", "--min-accuracy",
         "0", "--no-prefect", "--json"]


def _corrupt(paths) -> list[str]:
    for p in paths:
        p.write_bytes(p.read_bytes()[:120])  # a JPEG cut short, as an interrupted copy leaves it
    return [str(p) for p in paths]


def _compress(model, root, *args):
    r = CliRunner().invoke(main, ["compress", str(model), "--runs-dir", str(root / "runs"), "--registry",
                                  str(root / "registry"), *QUICK, *args])
    summary = json.loads(r.stdout) if r.exit_code in (0, 1) else None
    return r, summary


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder") / "images", 120, size=12)


def test_a_streamed_folder_serves_the_same_images_as_one_held_in_memory(folder):
    held = load_data(f"imagefolder:{folder}", (3, 8, 8), num_classes=10, augment=False)
    streamed = load_data(f"imagefolder:{folder}", (3, 8, 8), num_classes=10, augment=False, memory_mb=0)
    assert not held.streamed and streamed.streamed and "streamed from disk by" in streamed.held
    assert len(streamed.train) == len(held.train) and len(streamed.val) == len(held.val)
    assert streamed.mean == pytest.approx(held.mean, abs=1e-6) and streamed.std == pytest.approx(held.std, abs=1e-6)
    pairs = zip(make_loader(held.val, 16, shuffle=False), make_loader(streamed.val, 16, shuffle=False), strict=True)
    for (xa, ya), (xb, yb) in pairs:
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xb, xa)
    for (xa, _), (xb, _) in zip(mask_batches(held, 32, 3), mask_batches(streamed, 32, 3), strict=True):
        torch.testing.assert_close(xb, xa)
    # augmentation is drawn from (seed, epoch, image): the same epoch twice, whatever the workers, another epoch not
    aug = load_data(f"imagefolder:{folder}", (3, 8, 8), num_classes=10, memory_mb=0, workers=2)
    loader = make_loader(aug.train, 16, seed=0)
    first = [x for x, _ in loader]
    again = [x for x, _ in make_loader(aug.train.with_augment(aug.train.augment), 16, seed=0, num_workers=0)]
    loader.set_epoch(1)
    other = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_webdataset_shards_are_read_in_place_and_refused_with_one_line(folder, tmp_path):
    pattern = write_shards(folder, tmp_path / "shards", per_shard=50)
    assert pattern.endswith("shard-{000000..000002}.tar")
    held = load_data(f"imagefolder:{folder}", (3, 8, 8), num_classes=10, augment=False, memory_mb=0)
    shards = load_data(f"webdataset:{pattern}", (3, 8, 8), num_classes=10, augment=False, memory_mb=0)
    assert len(shards.train) + len(shards.val) == 120 and "3 shard(s)" in shards.source
    by_dir = load_data(f"webdataset:{tmp_path / 'shards'}", (3, 8, 8), num_classes=10, augment=False, memory_mb=0)
    assert by_dir.train_plain.files.names.tolist() == shards.train_plain.files.names.tolist()
    # the same pixels as the loose files they were written from (key class03_000013 is class03/000013.jpg)
    name = str(shards.val.files.names[0])
    key = name.split("/")[-1].replace("_", "/") + ".jpg"
    loose = held.val if key in held.val.files.names else held.train_plain
    i = loose.files.names.tolist().index(key)
    torch.testing.assert_close(shards.val.pixels(0), loose.pixels(i))
    assert int(shards.val.files.labels[0]) == int(loose.files.labels[i])

    with tarfile.open(tmp_path / "nolabel.tar", "w") as tar:
        tar.add(next(folder.glob("class00/*.jpg")), arcname="a.jpg")
    with pytest.raises(DataError, match=r"sample 'a' has an image but no label \(a\.cls\)"):
        load_data(f"webdataset:{tmp_path / 'nolabel.tar'}", (3, 8, 8), num_classes=10)
    with tarfile.open(tmp_path / "zipped.tar", "w:gz") as tar:
        tar.add(next(folder.glob("class00/*.jpg")), arcname="a.jpg")
    with pytest.raises(DataError, match="not a readable uncompressed tar shard"):
        load_data(f"webdataset:{tmp_path / 'zipped.tar'}", (3, 8, 8), num_classes=10)
    with pytest.raises(DataError, match=r"shard .*shard-000003.tar not found and 6 more"):
        load_data(f"webdataset:{tmp_path / 'shards'}/shard-{{000000..000009}}.tar", (3, 8, 8), num_classes=10)
    with pytest.raises(DataError, match="only shards on a file system"):
        load_data("webdataset:https://example.com/shard-{0..9}.tar", (3, 8, 8), num_classes=10)


def test_20000_images_compress_with_max_steps_and_a_second_run_reuses_the_split_file(tiny_at_init, tmp_path):
    images = write_folder(tmp_path / "big", 20_000, size=8)
    r, first = _compress(tiny_at_init, tmp_path, "--data", f"imagefolder:{images}", "--max-steps", "3",
                         "--val-images", "200", *STREAMED)
    assert r.exit_code == 0, r.output[-2000:]
    data = first["data"]
    assert data["train_images"] == 18_000 and data["val_images"] == 200 and data["val_total"] == 2000
    assert data["held"].startswith("streamed from disk")
    split = Path(data["split_file"])
    record = json.loads(split.read_text())
    assert len(record["val"]) == 2000 and record["train_images"] == 18_000
    assert (Path(first["run_dir"]) / "split.json").read_bytes() == split.read_bytes()
    history = json.loads((Path(first["run_dir"]) / "history.json").read_text())["epochs"]
    assert sum(h["steps"] for h in history) == 3 and history[-1]["images"] == 3 * 32
    report = json.loads((Path(first["run_dir"]) / "report.json").read_text())
    assert report["n_val"] == 200 and report["data"]["max_steps"] == 3

    # New images arrive and another run asks for other masks: it scores the same held-out images, from the file
    for k in range(20):
        (images / f"class{k % 10:02d}" / f"new{k}.jpg").write_bytes(next(images.glob("class00/*.jpg")).read_bytes())
    stamp = split.stat().st_mtime_ns
    r, second = _compress(tiny_at_init, tmp_path, "--data", f"imagefolder:{images}", "--max-steps", "3",
                          "--val-images", "200", "--sparsity", "0.8", *STREAMED)
    assert r.exit_code == 0, r.output[-2000:]
    assert second["run_dir"] != first["run_dir"] and second["data"]["split_file"] == str(split)
    assert split.stat().st_mtime_ns == stamp and json.loads(split.read_text()) == record
    assert second["data"]["val_total"] == 2000 and second["data"]["train_images"] == 18_020
    assert (Path(second["run_dir"]) / "split.json").read_bytes() == split.read_bytes()


def test_corrupt_jpegs_are_skipped_and_named_and_too_many_stop_the_run(tiny_at_init, tmp_path):
    images = write_folder(tmp_path / "images", 2000, size=8)
    files = sorted(images.glob("class0*/*.jpg"))
    bad = _corrupt(files[5:8])
    r, summary = _compress(tiny_at_init, tmp_path, "--data", f"imagefolder:{images}", "--epochs", "1",
                           "--max-bad-fraction", "0.002", *STREAMED)
    assert r.exit_code == 0 and summary["published"], r.output[-2000:]
    skipped = summary["data"]["unreadable"]
    assert skipped["unreadable"] == 3 and skipped["images"] == 2000
    named = {str(images / b["image"]) for b in skipped["first"]}
    assert named == set(bad)
    report_md = Path(summary["report_md"]).read_text()
    assert "unreadable images skipped | 3 of 2000" in report_md
    manifest = json.loads((Path(summary["registry_path"]) / "manifest.json").read_text())
    assert manifest  # published

    # 3 of 2000 is 0.15%: over the default limit of 0.1%, the run stops, exit 2, one line naming them
    r = subprocess.run([str(BIN / "force-compress"), "compress", str(tiny_at_init), "--data",
                        f"imagefolder:{images}", "--runs-dir", str(tmp_path / "runs2"), *QUICK[:-2], "--no-prefect",
                        *STREAMED], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 of the 2000 images are unreadable (0.15%, limit 0.10%)") and "Traceback" not in \
        r.stderr
    _corrupt(files[100:300])  # now 10%: stopped before any training
    r, _ = _compress(tiny_at_init, tmp_path, "--data", f"imagefolder:{images}", "--epochs", "1", *STREAMED)
    assert r.exit_code == 2
    assert "images are unreadable" in r.output and "limit 0.10%" in r.output and "--max-bad-fraction" in r.output


def test_two_processes_read_disjoint_halves_of_every_epoch(tiny_at_init, tmp_path):
    images = write_folder(tmp_path / "images", 220, size=8)
    log = tmp_path / "reads"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", READ_LOG_ENV: str(log)}
    r = subprocess.run([str(BIN / "force-compress"), "compress", str(tiny_at_init), "--data", f"imagefolder:{images}",
                        "--nproc", "2", "--epochs", "2", "--runs-dir", str(tmp_path / "runs"), "--registry",
                        str(tmp_path / "registry"), *QUICK, "--workers", "1", *STREAMED], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    val = set(json.loads(Path(summary["data"]["split_file"]).read_text())["val"])
    train = {str(p.relative_to(images)) for p in images.glob("*/*.jpg")} - val
    assert len(train) == 200  # 22 a class, 2 of each held out
    for epoch in (0, 1):
        reads = {}
        for rank in ("0", "1"):
            lines = Path(f"{log}.{rank}").read_text().split("\n")
            reads[rank] = [n for e, n in (ln.split(" ", 1) for ln in lines if ln) if int(e) == epoch and n not in val]
        # both ranks also read the same few batches once, up front, to re-estimate the train-time norms' statistics
        # before validation; the epochs' own reads are disjoint, so the images both read are exactly those
        for name in set(reads["0"]) & set(reads["1"]):
            for rank in ("0", "1"):
                reads[rank].remove(name)
        for rank in ("0", "1"):
            assert len(reads[rank]) == len(set(reads[rank])) == 100, (rank, epoch)
        assert set(reads["0"]).isdisjoint(reads["1"]) and set(reads["0"]) | set(reads["1"]) == train
    # the process that runs the other stages read the held-out split and the mask batches, not the epochs
    main_reads = {n for n in (ln.split(" ", 1)[1] for ln in Path(f"{log}.main").read_text().split("\n") if ln)}
    assert val <= main_reads
    assert np.isclose(summary["data"]["val_images"], len(val))


def test_what_a_streamed_loader_holds_is_bounded_in_bytes_not_images():
    from pipeline.files import IN_FLIGHT_MB, prefetch_factor, scoring_batch

    big, small = (3, 224, 224), (1, 8, 8)
    assert scoring_batch(big) == 55 and scoring_batch(small) == 256  # 32 MB of 224x224 RGB; the cap for digits
    assert prefetch_factor(2, 128, big) == 1 and prefetch_factor(2, 128, small) == 4
    for workers, batch in ((1, 32), (2, 128), (8, 64)):
        held = workers * prefetch_factor(workers, batch, big) * batch * 3 * 224 * 224 * 4 / 2**20
        assert held <= IN_FLIGHT_MB or prefetch_factor(workers, batch, big) == 1


def test_a_process_running_other_threads_starts_its_readers_from_a_forkserver(folder, tmp_path, monkeypatch):
    # A Prefect flow run or a sweep holds threads; a worker forked from such a process can inherit a lock some
    # thread held at that instant. Workers start from a forkserver: the same batches come back with a lock held
    # elsewhere, and what the worker is told (the read log, set after the server started) comes from this process.
    from pipeline import files
    from pipeline.files import worker_context

    monkeypatch.setattr(files, "SPILL_BYTES", 0)  # the workers get the file lists memory-mapped, as a large set's
    data = load_data(f"imagefolder:{folder}", (3, 8, 8), num_classes=10, augment=False, memory_mb=0)
    alone = [(x, y) for x, y in make_loader(data.val, 8, shuffle=False)]

    held, release = threading.Lock(), threading.Event()

    def busy():
        with held:  # a lock taken in another thread for the whole read, as a flow run's log worker can hold one
            release.wait(60)

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        assert worker_context().get_start_method() == "forkserver"
        from multiprocessing import forkserver

        forkserver.ensure_running()  # the server's environment is fixed from here on
        log = tmp_path / "reads"
        monkeypatch.setenv(READ_LOG_ENV, str(log))
        threaded = load_data(f"imagefolder:{folder}", (3, 8, 8), num_classes=10, augment=False, memory_mb=0)
        pairs = zip(alone, make_loader(threaded.val, 8, shuffle=False, num_workers=2), strict=True)
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    finally:
        release.set()
        thread.join()
    read = {ln.split(" ", 1)[1] for ln in Path(f"{log}.main").read_text().split("\n") if ln}
    assert len(read) >= len(data.val)


def test_a_large_file_list_reaches_a_worker_memory_mapped_and_its_folder_goes_with_it(folder, monkeypatch):
    import gc
    import pickle

    from pipeline import files

    listed = files.list_folder(folder, [f"class{k:02d}" for k in range(10)])
    assert "_spilled" not in vars(pickle.loads(pickle.dumps(listed)))  # small: pickled whole
    monkeypatch.setattr(files, "SPILL_BYTES", 0)
    copy = pickle.loads(pickle.dumps(listed))
    spilled = Path(vars(listed)["_spilled"])
    assert sorted(p.name for p in spilled.iterdir()) == ["labels.npy", "names.npy", "paths.npy"]
    assert isinstance(copy.paths, np.memmap) and copy.offsets is None
    assert all(np.array_equal(getattr(copy, k), getattr(listed, k)) for k in ("paths", "labels", "names"))
    assert copy.open(3) == listed.open(3)
    del listed
    gc.collect()
    assert not spilled.exists() and np.array_equal(copy.labels[:5], copy.labels[:5].copy())
