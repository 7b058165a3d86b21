"""Files written atomically, content hashes, and run directories.

Every output goes to a temporary name in the destination directory and is renamed into place,
so a failed or killed run never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import BadInputError

# mkstemp/mkdtemp create owner-only files (0600/0700); published outputs get the usual umask modes.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, FILE_MODE)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def run_dir_for(runs_root: str | os.PathLike, model_sha256: str, config_fingerprint: dict) -> Path:
    """The run id derives from the input model's hash and the config, so the same request resumes."""
    run_id = f"{model_sha256[:12]}-{sha256_json(config_fingerprint)[:12]}"
    return Path(runs_root) / run_id


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise BadInputError unless `path` is (or can be created as) a writable directory; creates nothing."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if probe != p and not probe.is_dir():
        raise BadInputError(f"cannot create {what} directory {path}: {probe} is not a directory")
    if probe == p and not p.is_dir():
        raise BadInputError(f"{what} {path} is not a directory; choose another --{what.replace(' ', '-')}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} directory {path} is not writable ({probe}); choose another --{what}")


class RunFiles:
    """The names of the files a run directory holds, one place for every stage that writes or reads them."""

    CONFIG = "config.json"
    SPLIT = "split.json"
    NORMALIZED = "normalized.onnx"
    MASKS = "masks.npz"
    MASKS_META = "masks.json"
    CUT = "cut.onnx"
    CUT_MASKS = "cut_masks.npz"
    CHECKPOINT = "checkpoint.pt"
    TRAINED = "trained.pt"
    HISTORY = "history.json"
    TRAIN_RESULT = "train_result.json"
    CURVE = "train_curve.png"
    EXPORTED = "model.sparse.onnx"
    COMPACT = "model.compact.onnx"
    INT8 = "model.int8.onnx"
    INT8_COMPACT = "model.int8.compact.onnx"
    REPORT_JSON = "report.json"
    REPORT_MD = "report.md"
    REPORT_PNG = "report.png"
    SUMMARY = "summary.json"
    ERROR = "error.txt"
    STAGE_RECORDS = ".stages"
