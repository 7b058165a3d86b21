"""What a published version holds and says about itself, the same for every publish target: its files
(`version_content`), its identity (the content hash over the model, the masks and every extra form), and its
`manifest.json` (`build_manifest`)."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import onnx

from pipeline.artifacts import RunFiles, sha256_file, sha256_json
from pipeline.errors import BadInputError
from pipeline.preprocessing import LABELS_KEY, PREPROCESSING_KEY, Preprocessing

MODEL_FILE = "model.onnx"
# The other forms a version may hold beside the primary dense FP32 file (stages.measure.forms roles).
FORM_FILES = {"compact": RunFiles.COMPACT, "int8": RunFiles.INT8, "int8_compact": RunFiles.INT8_COMPACT}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: str
    path: str  # the version directory (MLflow: the models:/NAME/VERSION URI)
    model_path: str
    content_hash: str
    created: bool  # False when the same content was already published under `version`

    def describe(self) -> str:
        return f"{self.path} ({'new' if self.created else 'same content as before'})"


@dataclass(frozen=True)
class VersionContent:
    """What a version holds, gathered from a run: each file under its name in the version, and its identity."""

    files: dict  # name in the version -> the run's file (Path)
    output_sha: str  # sha256 of the primary model file
    content_hash: str  # sha256 over the model, the masks and every extra form: what "the same content" means


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInputError(
            f"model name {name!r} cannot be a registry directory; use letters, digits, '.', '_', '-' (--name)"
        )
    return name


def version_content(run_dir: str | Path, report, masks_path: str | Path | None = None) -> VersionContent:
    """The files a version of this run holds (BadInputError when one is missing) and its content hash: the
    sha256 of the exported ONNX bytes, of the mask file and of every extra form. Every publish target
    identifies a version by it."""
    masks_path = Path(masks_path) if masks_path else Path(run_dir) / RunFiles.MASKS
    exported = Path(report.exported_path)

    files = {MODEL_FILE: exported, RunFiles.REPORT_JSON: Path(report.report_json),
             RunFiles.REPORT_MD: Path(report.report_md), RunFiles.REPORT_PNG: Path(report.report_png),
             RunFiles.MASKS: masks_path}
    extra = {f["role"]: f for f in report.forms if f["role"] in FORM_FILES}
    files.update({FORM_FILES[role]: Path(f["path"]) for role, f in extra.items()})
    sidecar = masks_path.with_suffix(".json")
    if sidecar.exists():
        files[RunFiles.MASKS_META] = sidecar
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise BadInputError(f"cannot publish: missing run outputs {', '.join(missing)}")

    output_sha = sha256_file(exported)
    content_hash = sha256_json({"model": output_sha, "masks": sha256_file(masks_path),
                                **{role: f["sha256"] for role, f in sorted(extra.items())}})
    return VersionContent(files, output_sha, content_hash)


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
                    "latency_ms": latency, "onnxruntime_loads": True,
                    "onnxruntime_only": f.get("onnxruntime_only", False), "openvino": f.get("openvino")})
    return out


def _preprocessing(model_path: Path) -> tuple[dict | None, list[str] | None]:
    """The preprocessing record and labels the published file carries in its metadata_props (export writes them
    from pipeline.preprocessing), repeated as they are there; None for a file exported without them."""
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
