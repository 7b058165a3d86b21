"""The directory publish target: `registry/<model-name>/<version>/`.

Versions are `v1`, `v2`, … in publishing order. A version's identity is its content hash (stages.publish.manifest):
publishing the same content again returns the version that already holds it instead of adding a duplicate. A version
is assembled in a hidden staging directory beside it and renamed into place, so a reader never sees half of one;
choosing the number and the rename happen under an exclusive `fcntl` lock on `registry/<model-name>/.lock`, so
processes publishing at once each get a consistent answer.
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


def check_directory(registry: str) -> None:
    check_writable_dir(registry, "registry")


def publish_to_directory(registry: str, name: str, content: VersionContent, report, config) -> PublishResult:
    content_hash = content.content_hash
    root = Path(registry) / name
    root.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    os.chmod(staging, DIR_MODE)
    try:
        for dest, src in content.files.items():
            shutil.copyfile(src, staging / dest)
        with _locked(root / ".lock"):
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
