"""The directory publish target: `registry/<model-name>/<version>/`.

Versions are `v1`, `v2`, … in publishing order. A version's identity is its content hash (stages.publish.manifest):
publishing the same content again returns the version that already holds it instead of adding a duplicate. A version
is assembled in a hidden staging directory beside it and renamed into place, so a reader never sees half of one;
choosing the number and the rename happen under an exclusive `fcntl` lock on `registry/<model-name>/.lock`, so
processes publishing at once each get a consistent answer.

A staging folder `.staging-XXXX/` lives exactly as long as its process holds an `fcntl` lock on `.staging-XXXX.lock`
beside it. A process killed while staging (SIGKILL, power loss) leaves both behind with the lock released by the
kernel, so every publish removes, under the registry lock, the staging folders whose lock nobody holds: never one
in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipeline.artifacts import DIR_MODE, check_writable_dir, write_bytes_atomic, write_json_atomic
from stages.publish.manifest import MODEL_FILE, PublishResult, VersionContent, build_manifest
from stages.publish.targets import Target, register_target

_VERSION = re.compile(r"^v(\d+)$")


def versions(registry: str | Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    root = Path(registry) / name
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
    return [v for _, v in sorted(found)]


_STAGING = ".staging-"


def check_directory(registry: str, name: str = "", need_bytes: int = 0) -> None:
    """The registry and the folders a version of `name` is written through are writable, their names fit, and
    there is room for `need_bytes`."""
    below = (name, f"{_STAGING}{'x' * 8}.lock") if name else ()
    check_writable_dir(registry, "registry", below=below, need_bytes=need_bytes)


def publish_to_directory(registry: str, name: str, content: VersionContent, report, config) -> PublishResult:
    content_hash = content.content_hash
    root = Path(registry) / name
    root.mkdir(parents=True, exist_ok=True)

    with _staging(root) as staging:
        for dest, src in content.files.items():
            shutil.copyfile(src, staging / dest)
        with _locked(root / ".lock"):
            remove_abandoned_staging(root)
            for v in versions(registry, name):
                if _content_hash(root / v) == content_hash:
                    return PublishResult(name, v, str(root / v), str(root / v / MODEL_FILE), content_hash, False)
            existing = versions(registry, name)
            version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
            manifest = build_manifest(config, report, name, version, content, staging)
            write_json_atomic(staging / "manifest.json", manifest)
            os.rename(staging, root / version)
            write_bytes_atomic(root / "LATEST", f"{version}\n".encode())
        return PublishResult(name, version, str(root / version), str(root / version / MODEL_FILE), content_hash, True)


@contextlib.contextmanager
def _staging(root: Path):
    """A new staging folder in `root`, locked (see the module's doc) until it is renamed or removed."""
    while True:  # the lock file first, then its folder: a folder is never seen without its lock held
        fd, lock_path = tempfile.mkstemp(prefix=_STAGING, suffix=".lock", dir=root)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break  # not removed by a cleaner between mkstemp and flock
        except FileNotFoundError:
            pass
        os.close(fd)
    staging = Path(lock_path[: -len(".lock")])
    try:
        staging.mkdir(mode=DIR_MODE)
        os.chmod(staging, DIR_MODE)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def remove_abandoned_staging(root: Path) -> list[str]:
    """Remove the staging folders (and lock files) in `root` whose lock no process holds: left by a killed
    publish. Returns their names."""
    removed = []
    for p in sorted(root.glob(f"{_STAGING}*")):
        lock_path = p if p.name.endswith(".lock") else p.with_name(p.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # a folder whose lock file is gone: its publish ended (or an older version's staging)
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
            folder = lock_path.with_name(lock_path.name[: -len(".lock")])
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            removed.append(folder.name)
        finally:
            if fd is not None:
                os.close(fd)
    return sorted(set(removed))


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _content_hash(version_dir: Path) -> str | None:
    try:
        return json.loads((version_dir / "manifest.json").read_text()).get("content_hash")
    except (OSError, ValueError):
        return None


register_target(Target("directory", "", check_directory, publish_to_directory))
