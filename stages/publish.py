"""Publish a model that passed the gate into the registry: `registry/<model-name>/<version>/`, or, for
`--registry mlflow:URI`, an MLflow Model Registry (stages/publish_mlflow.py; `publish` is the one place that
chooses). Imports no flows/prefect/click.

Versions are `v1`, `v2`, … in publishing order. A version's identity is its content hash (the sha256 of
the exported ONNX bytes and of the mask file): publishing the same content again returns the version
that already holds it instead of adding a duplicate. A version is assembled in a hidden staging
directory beside it and renamed into place, so a reader never sees half of one; choosing the number and
the rename happen under an exclusive `fcntl` lock on `registry/<model-name>/.lock`, so processes
publishing at once each get a consistent answer. Both targets identify a version by the same content hash
(`version_content`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pipeline.artifacts import DIR_MODE, sha256_file, sha256_json, write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig
from pipeline.errors import BadInputError, GateFailedError

MODEL_FILE = "model.onnx"
# The other forms a version may hold beside the primary dense FP32 file (stages.model_forms roles).
FORM_FILES = {"compact": "model.compact.onnx", "int8": "model.int8.onnx", "int8_compact": "model.int8.compact.onnx"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^v(\d+)$")


MLFLOW_PREFIX = "mlflow:"


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: str
    path: str  # the version directory (MLflow: the models:/NAME/VERSION URI)
    model_path: str
    content_hash: str
    created: bool  # False when the same content was already published under `version`


@dataclass(frozen=True)
class VersionContent:
    """What a version holds, gathered from a run: each file under its name in the version, and its identity."""

    files: dict  # name in the version -> the run's file (Path)
    output_sha: str  # sha256 of the primary model file
    content_hash: str  # sha256 over the model, the masks and every extra form: what "the same content" means


def mlflow_uri(registry: str) -> str | None:
    """The tracking URI of an `mlflow:URI` registry; None for a registry directory."""
    return registry[len(MLFLOW_PREFIX):] if str(registry).startswith(MLFLOW_PREFIX) else None


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInputError(
            f"model name {name!r} cannot be a registry directory; use letters, digits, '.', '_', '-' (--name)"
        )
    return name


def versions(registry: str | Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    root = Path(registry) / name
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
    return [v for _, v in sorted(found)]


def publish(
    run_dir: str | Path,
    report,
    config: CompressConfig,
    *,
    masks_path: str | Path | None = None,
) -> PublishResult:
    """Copy the exported model, its report and masks into a new registry version with a manifest; with
    `config.registry` = `mlflow:URI`, register it in that MLflow Model Registry instead.

    `report` is the ValidationReport of the run (or the path of its report.json); a report that did
    not pass the gate is refused with GateFailedError.
    """
    from stages.validate import ValidationReport, load_report

    if not isinstance(report, ValidationReport):
        report = load_report(report)
    if not report.passed:
        raise GateFailedError("refusing to publish: the validation gate failed: " + "; ".join(report.failures))
    name = check_model_name(config.model_name)
    content = version_content(run_dir, report, masks_path)
    uri = mlflow_uri(config.registry)
    if uri is not None:
        from stages.publish_mlflow import publish_to_mlflow

        return publish_to_mlflow(uri, name, content, report, config)
    return _publish_to_directory(name, content, report, config)


def version_content(run_dir: str | Path, report, masks_path: str | Path | None = None) -> VersionContent:
    """The files a version of this run holds (BadInputError when one is missing) and its content hash: the
    sha256 of the exported ONNX bytes, of the mask file and of every extra form. Every publish target
    identifies a version by it."""
    masks_path = Path(masks_path) if masks_path else Path(run_dir) / "masks.npz"
    exported = Path(report.exported_path)

    files = {MODEL_FILE: exported, "report.json": Path(report.report_json), "report.md": Path(report.report_md),
             "report.png": Path(report.report_png), "masks.npz": masks_path}
    extra = {f["role"]: f for f in report.forms if f["role"] in FORM_FILES}
    files.update({FORM_FILES[role]: Path(f["path"]) for role, f in extra.items()})
    sidecar = masks_path.with_suffix(".json")
    if sidecar.exists():
        files["masks.json"] = sidecar
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise BadInputError(f"cannot publish: missing run outputs {', '.join(missing)}")

    output_sha = sha256_file(exported)
    content_hash = sha256_json({"model": output_sha, "masks": sha256_file(masks_path),
                                **{role: f["sha256"] for role, f in sorted(extra.items())}})
    return VersionContent(files, output_sha, content_hash)


def _publish_to_directory(name: str, content: VersionContent, report, config: CompressConfig) -> PublishResult:
    content_hash = content.content_hash
    root = Path(config.registry) / name
    root.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    os.chmod(staging, DIR_MODE)
    try:
        for dest, src in content.files.items():
            shutil.copyfile(src, staging / dest)
        with _locked(root / ".lock"):
            for v in versions(config.registry, name):
                if _content_hash(root / v) == content_hash:
                    return PublishResult(name, v, str(root / v), str(root / v / MODEL_FILE), content_hash, False)
            existing = versions(config.registry, name)
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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict:
    ort = _version("onnxruntime-gpu") or _version("onnxruntime")
    return {
        "force-compress": _version("force-compress"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": ort,
        "onnx2torch": _version("onnx2torch"),
    }


def artifact_records(report) -> list[dict]:
    """Each published form with what validation measured of it: the file a user picks by size or speed."""
    out = []
    for f in report.forms:
        if f["role"] == "input":
            continue
        latency = {b: {k: v for k, v in t.items() if k in ("p50", "p90")} for b, t in f["latency_ms"].items()}
        out.append({"file": MODEL_FILE if f["role"] == "fp32" else FORM_FILES[f["role"]], "role": f["role"],
                    "primary": f["role"] == "fp32", "size": f["size"], "gzip_size": f["gzip_size"],
                    "sha256": f["sha256"], "top1": f["top1"], "top5": f["top5"],
                    "prunable_zeros": f["prunable_zeros"], "prunable_total": f["prunable_total"],
                    "latency_ms": latency, "onnxruntime_loads": True})
    return out


def _preprocessing(model_path: Path) -> tuple[dict | None, list[str] | None]:
    """The preprocessing record and labels the published file carries in its metadata_props (export writes them
    from pipeline.preprocessing), repeated as they are there; None for a file exported without them."""
    import onnx

    from pipeline.preprocessing import LABELS_KEY, PREPROCESSING_KEY, Preprocessing

    props = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    if PREPROCESSING_KEY not in props:
        return None, None
    Preprocessing.from_metadata(props, MODEL_FILE)  # what predict reads, or refused here
    return json.loads(props[PREPROCESSING_KEY]), json.loads(props.get(LABELS_KEY, "[]"))


def build_manifest(config, report, name, version: str | None, content: VersionContent, staging: Path) -> dict:
    """manifest.json of a version whose files lie in `staging` (MODEL_FILE among them)."""
    s = report.sparsity
    preprocessing, labels = _preprocessing(staging / MODEL_FILE)
    return {
        "name": name,
        "version": version,
        "content_hash": content.content_hash,
        "source": {"path": str(Path(config.model).resolve()), "sha256": sha256_file(config.model)},
        "output": {"file": MODEL_FILE, "sha256": content.output_sha},
        "primary": MODEL_FILE,
        "artifacts": artifact_records(report),
        "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
        "config": config.model_dump(mode="json"),
        "figures": {
            "top1": report.top1,
            "top5": report.top5,
            "n_val": report.n_val,
            "sparsity": s.sparsity,
            "params_sparsity": s.params_sparsity,
            "prunable_zeros": s.prunable_zeros,
            "prunable_total": s.prunable_total,
            "parity_max_abs": report.parity_max_abs,
            "parity_max_rel": report.parity_max_rel,
            "provider": report.provider,
            "latency_ms": report.latency_ms,
            "sizes": report.sizes,
            "structure": report.structure,
            "costs": report.costs,
        },
        "preprocessing": preprocessing,  # the same records as model.onnx's metadata_props
        "labels": labels,
        "versions": package_versions(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
