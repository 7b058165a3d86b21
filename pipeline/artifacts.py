"""Files written atomically, content hashes, and run directories.

Every output goes to a temporary name in the destination directory and is renamed into place,
so a failed or killed run never leaves a half-written file where a reader expects a whole one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import BadInputError, EnvironmentProblem

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


RUN_ID_TEMPLATE = "0" * 12 + "-" + "0" * 12  # how long a run directory's name is


def run_dir_for(runs_root: str | os.PathLike, model_sha256: str, config_fingerprint: dict) -> Path:
    """The run id derives from the input model's hash and the config, so the same request resumes."""
    run_id = f"{model_sha256[:12]}-{sha256_json(config_fingerprint)[:12]}"
    return Path(runs_root) / run_id


SPACE_MARGIN = 32 << 20  # bytes free beyond a directory's estimated need: logs, reports, the file system's own


def check_writable_dir(path: str | os.PathLike, what: str, *, below: tuple[str, ...] = (),
                       need_bytes: int = 0) -> None:
    """Before any work, for a directory we will write: it is (or can be created as) a directory (BadInputError, exit
    2, when a file is in the way), writable by us (EnvironmentProblem, exit 3), every name down to `below` (what
    we will create inside it, e.g. a staging folder) fits the file system (exit 3), and its file system has
    `need_bytes` plus SPACE_MARGIN free (exit 3). Creates nothing."""
    p = Path(path).absolute()
    full = p.joinpath(*below)
    probe = full
    while not _exists(probe):
        probe = probe.parent
    option = f"--{what.replace(' ', '-')}"
    if not probe.is_dir():
        if probe == p:
            raise BadInputError(f"{what} {path} is not a directory; choose another {option}")
        raise BadInputError(f"cannot create {what} directory {full}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"{what} directory {full} is not writable ({probe}: permission denied); make it "
                                 f"writable or choose another {option}")
    name_max = _pathconf(probe, "PC_NAME_MAX", 255)
    for part in full.parts:
        if len(os.fsencode(part)) > name_max:
            raise EnvironmentProblem(f"{what} path {full}: the name {part[:32]!r}... is {len(os.fsencode(part))} "
                                     f"bytes, longer than the {name_max} the file system allows; choose a shorter "
                                     f"{option} or --model-name")
    path_max = _pathconf(probe, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(full))) + 64 >= path_max:  # 64: the longest file name we write below it
        raise EnvironmentProblem(f"{what} path {full} is {len(os.fsencode(str(full)))} bytes, too close to the "
                                 f"{path_max} the file system allows; choose a shorter {option}")
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes + SPACE_MARGIN:
        raise EnvironmentProblem(f"{what} {path}: {free / 1e6:.1f} MB free on its file system, the run needs about "
                                 f"{(need_bytes + SPACE_MARGIN) / 1e6:.1f} MB there; free space or choose another "
                                 f"{option}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to look up: reported with the name checks
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


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
