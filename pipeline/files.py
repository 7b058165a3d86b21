"""Images that stay on disk until a batch needs them: a list of where each image lives (a loose file, or a member of
a WebDataset tar shard), decoded, resized, augmented and normalised in DataLoader worker processes, batch by batch.
Nothing here holds pixels of more than the batches in flight.

An image that cannot be decoded is skipped and counted (`BadImages`): its batch is one image shorter, its name is
kept (the first ten go to the report), and a pass over the data that found more than the allowed fraction of bad
images raises DataError (exit 2).

Imports torch, numpy, PIL and braceexpand only; never stages or flows."""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import DataError
from pipeline.geometry import Geometry
from pipeline.images import IMAGE_EXTENSIONS, Augment, augment_batch, map_channels, read_image

MAX_BAD_FRACTION = 0.001  # default: a pass that finds more than this share of its images unreadable stops the run
NAMED_BAD = 10  # unreadable images named in the report
READ_LOG_ENV = "FORCE_COMPRESS_READ_LOG"  # debugging the data plane: each process appends "epoch name" lines to
# $FORCE_COMPRESS_READ_LOG.<rank> (torchrun workers) or .main
_SHARD_LABEL_EXTS = ("cls", "label")
SPILL_BYTES = 32 * 2**20  # a file list larger than this reaches forkserver workers as memory-mapped arrays


# ----------------------------------------------------------------------------------------------- file lists


@dataclass(frozen=True)
class FileList:
    """Where each image lives and its label. Loose files: `offsets` is None and `paths[i]` is the image file. Shard
    members: `paths[i]` is the tar shard and (`offsets[i]`, `sizes[i]`) the member's bytes in it. `names[i]` is how a
    split file and the report name the image (a path relative to the data's root, or `shard/key`). Arrays, not
    Python lists, so that forked DataLoader workers do not copy them by touching reference counts."""

    paths: np.ndarray
    labels: np.ndarray
    names: np.ndarray
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getstate__(self) -> dict:
        """What a forkserver worker receives: a large list as the folder of its arrays, memory-mapped there (one copy
        in the page cache for all workers, not one pickled copy each: ImageNet's 1.28M paths are ~0.9 GB as arrays)."""
        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        if sum(a.nbytes for a in arrays.values()) < SPILL_BYTES:
            return vars(self).copy()
        if "_spilled" not in vars(self):
            import shutil
            import tempfile
            import weakref

            folder = tempfile.mkdtemp(prefix="force-compress-files-")
            for k, a in arrays.items():
                np.save(os.path.join(folder, f"{k}.npy"), a)
            weakref.finalize(self, shutil.rmtree, folder, True)  # workers keep their maps of the unlinked files
            object.__setattr__(self, "_spilled", folder)
        return {"_spilled": vars(self)["_spilled"], **{k: v for k, v in vars(self).items() if k not in arrays}}

    def __setstate__(self, state: dict) -> None:
        folder = state.get("_spilled")
        for k, v in state.items():
            object.__setattr__(self, k, v)
        if folder:
            for f in os.listdir(folder):
                object.__setattr__(self, f[:-4], np.load(os.path.join(folder, f), mmap_mode="r"))

    def subset(self, idx: np.ndarray) -> FileList:
        idx = np.asarray(idx, dtype=np.int64)
        return FileList(self.paths[idx], self.labels[idx], self.names[idx],
                        None if self.offsets is None else self.offsets[idx],
                        None if self.sizes is None else self.sizes[idx])

    def open(self, i: int):
        """The image's bytes as a file object PIL can read."""
        if self.offsets is None:
            return str(self.paths[i])
        with open(str(self.paths[i]), "rb") as f:
            f.seek(int(self.offsets[i]))
            return io.BytesIO(f.read(int(self.sizes[i])))


def _file_list(paths: list[str], labels: list[int], names: list[str], offsets=None, sizes=None) -> FileList:
    return FileList(np.array(paths, dtype=str), np.asarray(labels, dtype=np.int64), np.array(names, dtype=str),
                    None if offsets is None else np.asarray(offsets, dtype=np.int64),
                    None if sizes is None else np.asarray(sizes, dtype=np.int64))


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_folder(root: Path, classes: Sequence[str], names_from: Path | None = None) -> FileList:
    """The images of a class-per-folder tree (sorted, so the same tree lists the same way everywhere), labelled by
    their folder's index in `classes`; names relative to `names_from` (default `root`)."""
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, empty = [], [], []
    for d in class_dirs(root):
        if d.name not in index:
            raise DataError(f"image folder {root}: class folder {d.name!r} is not among the training classes")
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(index[d.name])
        if len(paths) == before:
            empty.append(d.name)
    kinds = f"{', '.join(IMAGE_EXTENSIONS[:4])}, ..."
    if not paths:
        raise DataError(f"image folder {root} holds no images ({kinds}) in its class folders")
    if empty:  # it would still count as a class: the model's labels would no longer match its outputs
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"image folder {root}: class folder {empty[0]!r}{more} holds no images ({kinds}); remove it "
                        "or add images")
    base = str(names_from or root)
    return _file_list(paths, labels, [os.path.relpath(p, base) for p in paths])


def expand_shards(pattern: str) -> list[Path]:
    """Local tar shards named by a brace pattern (`data/train-{0000..0099}.tar`), a directory (its *.tar), or a
    file."""
    from braceexpand import braceexpand

    if "://" in pattern or pattern.startswith("pipe:"):
        raise DataError(f"webdataset:{pattern}: only shards on a file system are read (a mounted bucket works); "
                        "copy or mount them, no unpacking needed")
    p = Path(pattern).expanduser()
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
        if not shards:
            raise DataError(f"webdataset:{pattern}: the directory holds no .tar shards")
        return shards
    shards = [Path(s).expanduser() for s in braceexpand(pattern)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"webdataset:{pattern}: shard {missing[0]} not found{more}")
    return shards


def list_shards(shards: Sequence[Path], names_from: Path) -> FileList:
    """The image members of WebDataset tar shards, with their labels (`KEY.cls`: an integer as text), found by
    reading the tar headers (a pass over the headers, not the pixels). A sample is the members sharing a key (the
    member path up to the first dot of its file name), as WebDataset groups them."""
    paths, labels, names, offsets, sizes = [], [], [], [], []
    for shard in shards:
        images: dict[str, tuple[int, int]] = {}
        found: dict[str, int] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # plain tar: member data is read in place, by offset
                for m in tar:
                    if not m.isfile():
                        continue
                    head, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{head}/{stem}" if head else stem
                    if ext.lower() in (e[1:] for e in IMAGE_EXTENSIONS):
                        images[key] = (m.offset_data, m.size)
                    elif ext.lower() in _SHARD_LABEL_EXTS:
                        text = tar.extractfile(m).read().decode("utf-8", "replace").strip()
                        try:
                            found[key] = int(text)
                        except ValueError:
                            raise DataError(f"{shard}: {m.name} holds {text[:20]!r}, not an integer class") from None
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{shard}: not a readable uncompressed tar shard ({e}); rewrite it as .tar") from None
        rel = os.path.relpath(shard, names_from)
        for key in sorted(images):
            if key not in found:
                raise DataError(f"{shard}: sample {key!r} has an image but no label ({key}.cls); WebDataset "
                                "classification shards hold KEY.jpg (or .png, ...) and KEY.cls")
            paths.append(str(shard))
            labels.append(found[key])
            names.append(f"{rel}/{key}")
            offsets.append(images[key][0])
            sizes.append(images[key][1])
    if not paths:
        raise DataError(f"the shards ({shards[0]}, ...) hold no image samples")
    return _file_list(paths, labels, names, offsets, sizes)


# ------------------------------------------------------------------------------------------ unreadable images


@dataclass
class BadImages:
    """The images of one run's data that could not be decoded; shared by the splits of one opened data set (main
    process: what DataLoader workers report with their batches). The limit is on the share of the data set's
    `total` images found unreadable so far, so it never stops a run on an early sample that happened to hold one."""

    max_fraction: float = MAX_BAD_FRACTION
    total: int = 0  # images the data set lists
    read: int = 0  # images decoded or tried, re-reads included
    bad: dict[str, str] = field(default_factory=dict)  # name -> the decoder's complaint, in the order found

    def record(self, read: int, bad: Sequence[tuple[str, str]]) -> None:
        self.read += int(read)  # a count for the log: a race between a sweep's threads costs nothing
        for name, why in bad:
            self.bad.setdefault(name, why)
        if bad:
            self.check()

    def check(self) -> None:
        """DataError when more than `max_fraction` of the data set's images are known to be unreadable."""
        n, total = len(self.bad), max(self.total, 1)
        if n > self.max_fraction * total:
            raise DataError(f"{n} of the {total} images are unreadable ({n / total:.2%}, limit {self.max_fraction:.2%}"
                            f"): {self.first(3)}; repair or remove them, or raise --max-bad-fraction")

    def first(self, n: int = NAMED_BAD) -> str:
        names = list(self.bad)
        return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")

    def summary(self) -> dict:
        """What the report says: how many images the data holds and how many were skipped, the first NAMED_BAD by
        name."""
        return {"images": self.total, "unreadable": len(self.bad),
                "first": [{"image": k, "error": v} for k, v in list(self.bad.items())[:NAMED_BAD]]}


# -------------------------------------------------------------------------------------------------- dataset


class FileImageDataset(Dataset):
    """The images of a FileList at the model's (C, H, W): each decoded, fitted by `geometry`, scaled to [0, 1],
    normalised and (training) augmented in the process that reads it. Items are indexed by (index, epoch): the
    augmentation of an image is drawn from (seed, epoch, index), the same whichever worker reads it."""

    def __init__(self, files: FileList, shape: tuple[int, int, int], geometry: Geometry, mean, std,
                 augment: Augment | None = None, *, seed: int = 0, bad: BadImages | None = None, workers: int = 2):
        self.files, self.shape, self.geometry = files, tuple(shape), geometry
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment or Augment()
        self.seed, self.workers = int(seed), int(workers)
        self.bad = bad if bad is not None else BadImages()
        # read here, not in the worker: a forkserver worker sees the server's environment, not this process's
        self.read_log = _read_log_path()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.files.labels)

    def with_augment(self, augment: Augment | None) -> FileImageDataset:
        return FileImageDataset(self.files, self.shape, self.geometry, self.mean.flatten().tolist(),
                                self.std.flatten().tolist(), augment, seed=self.seed, bad=self.bad,
                                workers=self.workers)

    def normalised(self, mean, std) -> FileImageDataset:
        return FileImageDataset(self.files, self.shape, self.geometry, mean, std, self.augment, seed=self.seed,
                                bad=self.bad, workers=self.workers)

    def pixels(self, i: int) -> torch.Tensor:
        """Image `i` as (C, H, W) float32 in [0, 1] at the model's size (raises what the decoder raises)."""
        c, h, w = self.shape
        a = read_image(self.files.open(i), "L" if c == 1 else "RGB", (h, w), self.geometry)
        x = torch.from_numpy(np.array(a.reshape(h, w, -1))).permute(2, 0, 1).float().div_(255.0)
        return map_channels(x[None], c)[0]

    def __getitem__(self, item) -> tuple[torch.Tensor, int, str]:
        """(normalised image, label, "" or why it is unreadable) of item (index, epoch) or index."""
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        if self.read_log:
            _log_read(self.read_log, str(self.files.names[i]), epoch)
        try:
            x = self.pixels(i)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            return torch.zeros(self.shape), int(self.files.labels[i]), f"{type(e).__name__}: {str(e)[:120]}" or "?"
        if self.augment.active:
            g = torch.Generator().manual_seed(hash((self.seed, epoch, i)) & 0x7FFF_FFFF_FFFF)
            x = augment_batch(x[None], self.augment, g)[0]
        return (x - self.mean) / self.std, int(self.files.labels[i]), ""

    def collate(self, items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], int]:
        """A batch of the readable items, the unreadable ones' (name, why), and how many were read. (Runs in the
        worker: names come from the worker's copy of the list, by the label-free index kept in the item.)"""
        keep = [k for k, it in enumerate(items) if not it[2]]
        bad = [(it[3], it[2]) for it in items if it[2]]
        x = torch.stack([items[k][0] for k in keep]) if keep else torch.zeros((0, *self.shape))
        y = torch.tensor([items[k][1] for k in keep], dtype=torch.int64)
        return x, y, bad, len(items)

    def batches(self, index_batches: Sequence[Sequence[int]], epoch: int = 0,
                workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of the given indices, in order, read by DataLoader workers (unreadable images skipped and
        counted)."""
        n = self._workers(workers, len(index_batches))
        loader = DataLoader(_Named(self), batch_sampler=[[(int(i), epoch) for i in b] for b in index_batches],
                            collate_fn=self.collate, num_workers=n,
                            multiprocessing_context=worker_context() if n else None)
        yield from _counted(loader, self.bad)

    def batch(self, idx, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of the given indices (read in this process)."""
        return next(iter(self.batches([list(map(int, idx))], workers=0)))

    def _workers(self, asked: int | None, batches: int) -> int:
        return max(0, min(self.workers if asked is None else asked, batches))


class _Named(Dataset):
    """A FileImageDataset whose items also carry the image's name (what an unreadable item is reported by)."""

    def __init__(self, ds: FileImageDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        x, y, why = self.ds[item]
        i = item[0] if isinstance(item, tuple) else item
        return x, y, why, str(self.ds.files.names[i])


def _counted(loader, bad: BadImages) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y, unreadable, n in loader:
        bad.record(n, unreadable)
        if len(y):
            yield x, y


def _read_log_path() -> str | None:
    path = os.environ.get(READ_LOG_ENV)
    rank = os.environ.get("RANK", "main")  # a torchrun worker, or the process that runs the other stages
    return f"{path}.{rank}" if path else None


def _log_read(path: str, name: str, epoch: int) -> None:
    with open(path, "a") as f:
        f.write(f"{epoch} {name}\n")


def worker_context():
    """How DataLoader workers start: from a forkserver, never forked from this process. A process that forks while
    another of its threads holds a lock hands the worker that lock held, and a worker that needs it waits forever;
    this process has such threads whenever it matters (a Prefect flow run's, a sweep's cells, and the queue feeder
    threads of every DataLoader still alive). A CI run of the suite so waited 15 minutes, its workers alive and no
    batch. Python 3.14 makes forkserver the default for this reason."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # the server imports torch and PIL once; each worker forks from it
    return ctx


# --------------------------------------------------------------------------------------------------- loader


class _EpochSampler:
    """A DistributedSampler's indices, each tagged with the epoch (what the dataset seeds augmentation with)."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def __iter__(self):
        return ((i, self.epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class FileLoader:
    """Batches of a FileImageDataset in the order of DistributedSampler(seed, epoch) for this rank, read by
    persistent DataLoader workers (pinned memory on CUDA). Unreadable images are skipped and counted; a finished pass
    checks the count against the limit. `set_epoch` as DistributedSampler."""

    def __init__(self, dataset: FileImageDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, workers: int | None = None,
                 pin_memory: bool = False):
        from torch.utils.data.distributed import DistributedSampler

        self.dataset, self.batch_size, self.drop_last = dataset, int(batch_size), drop_last
        self.sampler = DistributedSampler(range(len(dataset)), num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        self.tagged = _EpochSampler(self.sampler)
        n = dataset._workers(workers, len(self))
        self.loader = DataLoader(_Named(dataset), batch_size=self.batch_size, sampler=self.tagged,
                                 collate_fn=dataset.collate, num_workers=n, persistent_workers=n > 0,
                                 multiprocessing_context=worker_context() if n else None,
                                 pin_memory=pin_memory, drop_last=drop_last,
                                 prefetch_factor=prefetch_factor(n, self.batch_size, dataset.shape) if n else None)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.tagged.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from _counted(self.loader, self.dataset.bad)


IN_FLIGHT_MB = 256  # decoded batches waiting in the workers' queues, at most (at least one a worker)


def prefetch_factor(workers: int, batch_size: int, shape) -> int:
    """Batches each worker reads ahead: up to 4, fewer where that many would hold more than IN_FLIGHT_MB (128
    images at 224x224 are 77 MB a batch). A worker that decodes slower than the loop consumes is kept busy by one."""
    batch_mb = batch_size * math.prod(shape) * 4 / 2**20
    return max(1, min(4, int(IN_FLIGHT_MB // max(workers * batch_mb, 1e-9))))


def scoring_batch(shape, cap: int = 256, batch_mb: float = 32.0) -> int:
    """Images a batch when a model only scores (no gradients): `cap`, or fewer where a batch of them would pass
    `batch_mb` (55 images at 3x224x224), so scoring a large held-out set holds as little as one training step."""
    return max(1, min(cap, int(batch_mb * 2**20 // (math.prod(shape) * 4))))


def default_workers() -> int:
    """DataLoader workers when none are asked for: one per core, at most 8 (decoding is what they do)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
