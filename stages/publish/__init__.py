"""Stage `publish`: a model that passed the gate goes to its registry, `registry/<model-name>/<version>/` or, for
`--registry mlflow:URI`, an MLflow Model Registry. The targets are a small registry of their own (`targets`), each
with a check made before any work; the version's files, identity and manifest are shared by all (`manifest`).
Imports no flows/prefect/click."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import GateFailedError
from pipeline.stage import Stage
from stages.measure.report import ValidationReport, load_report
from stages.publish import directory, mlflow_registry  # noqa: F401  (register the targets)
from stages.publish.directory import versions
from stages.publish.manifest import MODEL_FILE, PublishResult, check_model_name, version_content
from stages.publish.targets import resolve

__all__ = ["MODEL_FILE", "STAGE", "PublishResult", "check_registry", "publish", "publish_stage", "versions"]


def check_registry(registry: str, name: str = "", need_bytes: int = 0) -> None:
    """Before any work: the registry named by `--registry` is one we can publish to (exit 2), answers, is writable
    down to where a version of `name` goes and has room for `need_bytes` (exit 3)."""
    target, location = resolve(registry)
    target.check(location, name, need_bytes)


def publish(run_dir: str | Path, report: ValidationReport | str | Path, config, *,
            masks_path: str | Path | None = None) -> PublishResult:
    """Copy the exported model, its report and masks into a new registry version with a manifest (or return the
    version that holds the same content). `report` is the run's ValidationReport (or the path of its report.json);
    one that did not pass the gate is refused with GateFailedError."""
    if not isinstance(report, ValidationReport):
        report = load_report(report)
    if not report.passed:
        raise GateFailedError("refusing to publish: the validation gate failed: " + "; ".join(report.failures))
    name = check_model_name(config.model_name)
    content = version_content(run_dir, report, masks_path)
    target, location = resolve(config.registry)
    return target.publish(location, name, content, report, config)


def publish_stage(run_dir: str, report: ValidationReport, masks_path: str, config) -> PublishResult:
    """The pipeline's publish of a run whose validation `report` passed, with its masks file."""
    return publish(run_dir, report, config, masks_path=masks_path)


# Never cached: it depends on the registry's state, and is idempotent by content.
STAGE = Stage("publish", publish_stage, reads=None, outputs=())
