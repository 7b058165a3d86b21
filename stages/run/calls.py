"""One call of a stage, and its cache. Both paths cache the same way: a finished stage's record is kept in
run_dir/.stages/<stage>.pkl under a key of what it reads (code version, its input files' hashes, the config fields
it declares); a call whose record has the same key and whose output files exist is not run again."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import RunFiles, sha256_file, sha256_json, write_bytes_atomic
from pipeline.config import CompressConfig, ConfigView
from pipeline.data import DataSplits
from pipeline.stage import Stage, StageResult


@dataclass(frozen=True)
class StageCall:
    """What `run_stage` receives: the stage, the keyword arguments of its function, and the run directory its
    record goes to (None: not cached)."""

    stage: Stage
    kwargs: dict
    run_dir: str | None = None

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def fn(self) -> Callable[..., Any]:
        return self.stage.fn

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(str(Path(self.run_dir) / o) for o in self.stage.outputs) if self.run_dir else ()


RunStage = Callable[[StageCall], Any]
OnReused = Callable[[StageCall, Any], None]


def call_stage(call: StageCall) -> Any:
    """The plain way to run a stage: call it."""
    return call.stage(**call.kwargs)


def describe(result: Any) -> str:
    """One line about a finished stage's result (a record of another kind says nothing)."""
    return result.describe() if isinstance(result, StageResult) else ""


def _digest(value: Any) -> Any:
    """A stable, small stand-in for a stage argument: files by content hash, a config view by its declared fields
    (a whole config by its fingerprint), the opened data by its shape (its spec, split and seed are declared
    fields of every stage that gets it)."""
    if isinstance(value, ConfigView):
        return {"fields": _digest(value.values())}
    if isinstance(value, CompressConfig):
        return value.fingerprint()
    if isinstance(value, DataSplits):
        return {"data": [value.input_shape, value.num_classes, len(value.train_plain), len(value.val), value.mean,
                         value.std]}
    if isinstance(value, str | os.PathLike) and Path(value).is_file():
        return {"path": str(value), "sha256": _file_sha256(value)}
    if is_dataclass(value) and not isinstance(value, type):
        return _digest(asdict(value))
    if isinstance(value, dict):
        return {str(k): _digest(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_digest(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the code a stage result depends on (force_core, pipeline, stages): editing it invalidates caches."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in ("force_core", "pipeline", "stages"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name != "cli.py":
                h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)  # trained.pt (~100 MB for a resnet18) is an input of two stages: hash it once per content
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_file(path)


def stage_key(call: StageCall) -> str:
    """Cache key of a stage call: its name and function, the code version, its input files' hashes and the
    declared config fields' values (never a pickle of the inputs)."""
    fn = f"{call.fn.__module__}.{call.fn.__qualname__}"
    return sha256_json({"stage": call.name, "fn": fn, "code": code_version(), "args": _digest(call.kwargs)})


def record_path(call: StageCall) -> Path | None:
    """run_dir/.stages/<stage>.pkl: the last finished call of the stage in this run directory, with its key."""
    return Path(call.run_dir) / RunFiles.STAGE_RECORDS / f"{call.name}.pkl" \
        if call.stage.cached and call.run_dir else None


def cached_call(call: StageCall, run_stage: RunStage) -> tuple[Any, bool]:
    """(result, reused): the recorded result when the stage's record has the same key (code version, input files'
    hashes, declared config fields) and its output files exist; else `run_stage(call)`, then its record. The
    record is removed before the stage runs, so one left behind always describes the files beside it, whoever
    (plain path or flow, this request or another) wrote them last."""
    path = record_path(call)
    if path is None:
        return run_stage(call), False
    key = stage_key(call)
    if path.exists() and all(Path(p).exists() for p in call.outputs):
        try:
            # Our own file in our own run directory (as checkpoint.pt is); any unreadable record is a miss.
            record = pickle.loads(path.read_bytes())
            if record["key"] == key:
                return record["result"], True
        except Exception:  # noqa: BLE001 - a stale or torn record: run the stage
            pass
    path.unlink(missing_ok=True)
    result = run_stage(call)
    write_bytes_atomic(path, pickle.dumps({"key": key, "stage": call.name, "result": result}))
    return result, False
