"""Publish a model that passed the gate to an MLflow Model Registry (`--registry mlflow:URI`). Imports no
flows/prefect/click; mlflow itself is imported inside the functions, so the CLI pays for it only when it is used.

URI is `sqlite:///PATH` (a local store; artifacts go to `mlartifacts/` beside the database file, the artifact
location of the experiment when force-compress creates it) or `http(s)://HOST[:PORT]` (a tracking server, which
stores artifacts where it was started to). A version is one run of the experiment `force-compress`: the config as
params, the report's figures as metrics (the manifest's `figures` and each form's, flattened), the version's
files (report, masks, manifest, extra forms) as artifacts, model.onnx in MLflow's onnx flavour, and last, a
registered model version `NAME/N` tagged with method, structure, sparsity, top1 and content_hash.

The same content (stages.publish.manifest.version_content) is never registered twice: a version whose content_hash tag
matches is returned instead. The model version is created last, so one that exists is complete; anything created
before a failure is deleted again where the store still answers, and the failure is an EnvironmentProblem (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.artifacts import check_writable_dir
from pipeline.config import CompressConfig
from pipeline.errors import BadInputError, EnvironmentProblem
from stages.onnx_convert.model_io import fits_in_protobuf
from stages.publish.manifest import MODEL_FILE, PublishResult, VersionContent, artifact_records, build_manifest
from stages.publish.targets import Target, register_target

PREFIX = "mlflow:"

EXPERIMENT = "force-compress"
ARTIFACTS_DIR = "mlartifacts"  # beside a sqlite database: where its experiment keeps artifacts
USAGE = "use mlflow:sqlite:///PATH.db or mlflow:http://HOST:PORT"
# MLflow's HTTP client retries 7 times with growing back-off (minutes against a dead server) and waits 120 s per
# request; an unreachable registry should be exit 3 within seconds. Only where the user has not chosen.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def parse_uri(uri: str) -> tuple[str, Path | None]:
    """("sqlite", database path) or ("http", None) for a tracking URI we can publish to; BadInputError else."""
    uri = (uri or "").strip()
    if not uri:
        raise BadInputError(f"--registry mlflow: needs a tracking URI; {USAGE}")
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            database = make_url(uri).database
        except ArgumentError:
            database = None
        if not uri.startswith("sqlite:///") or not database or database == ":memory:":
            raise BadInputError(f"MLflow URI {uri!r} names no database file; {USAGE} "
                                "(three slashes and a relative path, four and an absolute one)")
        return "sqlite", Path(database)
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise BadInputError(f"MLflow URI {uri!r} has a bad port; {USAGE}") from None
        return "http", None
    raise BadInputError(f"unsupported MLflow URI {uri!r}; {USAGE}")


def check_mlflow_registry(uri: str, name: str = "", need_bytes: int = 0) -> None:
    """Before any work: BadInputError (exit 2) for a URI we cannot use or a database file we could not write,
    EnvironmentProblem (exit 3) for a tracking server that does not answer. Creates nothing."""
    kind, database = parse_uri(uri)
    if kind == "sqlite":
        check_writable_dir(database.absolute().parent, "registry", need_bytes=need_bytes)
        if database.exists():
            _check_sqlite_file(database)
        return
    with _http_limits():
        client = _client(uri)
        try:
            client.get_experiment_by_name(EXPERIMENT)  # a real API call: reachable, and we may read it
        except Exception as e:  # noqa: BLE001 - whatever the client raises, the registry is not usable now
            raise EnvironmentProblem(f"no MLflow tracking server answers at {uri} ({_reason(e)}); start one "
                                     "(mlflow server --host 127.0.0.1 --port 5000) or fix --registry") from None


def _check_sqlite_file(database: Path) -> None:
    if not database.is_file():
        raise BadInputError(f"MLflow database {database} is not a file; choose another --registry")
    if not os.access(database, os.R_OK | os.W_OK):
        raise BadInputError(f"MLflow database {database} is not writable; choose another --registry")
    with open(database, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        raise BadInputError(f"{database} is not an SQLite database; choose another --registry")


def publish_to_mlflow(uri: str, name: str, content: VersionContent, report, config: CompressConfig) -> PublishResult:
    """Register the version (or return the one that holds the same content) in the MLflow registry at `uri`."""
    kind, database = parse_uri(uri)
    created: dict = {}  # what this call made, to delete again on failure: run_id, model_id, version
    with _http_limits(), _tracking_uri(uri):
        client = _client(uri)
        try:
            if kind == "sqlite":
                database.absolute().parent.mkdir(parents=True, exist_ok=True)
            found = _published(client, name, content.content_hash)
            if found is not None:
                return _result(name, found, content.content_hash, created=False)
            experiment_id = _experiment(client, uri, database)
            version = _register(client, uri, experiment_id, name, content, report, config, created)
            # Two publishers of the same content at once: the later version gives way to the earlier one.
            first = _published(client, name, content.content_hash)
            if first is not None and int(first.version) < int(version.version):
                _undo(client, name, created)
                return _result(name, first, content.content_hash, created=False)
            return _result(name, version, content.content_hash, created=True)
        except BaseException as e:
            left = _undo(client, name, created)
            if isinstance(e, EnvironmentProblem) or not _is_environment(e):
                raise
            what = f"; left behind, the store not answering: {left}" if left else ""
            raise EnvironmentProblem(f"publishing {name} to the MLflow registry {uri} failed ({_reason(e)}); "
                                     f"nothing was registered{what}") from None


def _register(client, uri: str, experiment_id: str, name: str, content: VersionContent, report, config, created: dict):
    """One run with params, metrics and artifacts, the onnx flavour, then the model version (the last step)."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    run = client.create_run(experiment_id, run_name=f"{name}-{content.content_hash[:12]}",
                            tags={"force_compress.content_hash": content.content_hash,
                                  "force_compress.model_name": name})
    run_id = created["run_id"] = run.info.run_id
    params = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in
              sorted(config.model_dump(mode="json").items())]
    now = get_current_time_millis()
    metrics = [Metric(k, v, now, 0) for k, v in sorted(figures(report).items())]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params and 1000 metrics per call
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])

    with tempfile.TemporaryDirectory(prefix="fc-mlflow-") as tmp:
        staging = Path(tmp) / "version"
        staging.mkdir()
        for dest, src in content.files.items():
            shutil.copyfile(src, staging / dest)
        manifest = build_manifest(config, report, name, None, content, staging)  # the version number comes last
        manifest["registry"] = f"{PREFIX}{uri}"
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        model = onnx.load(str(staging / MODEL_FILE))
        (staging / MODEL_FILE).unlink()  # it goes in the onnx flavour, not twice
        client.log_artifacts(run_id, str(staging), "version")

    with mlflow.start_run(run_id=run_id):  # the flavour logs into the active run; leaving it ends the run
        info = mlflow.onnx.log_model(
            model, name="model", signature=_signature(model),
            # one file, as exported (external data only where protobuf's 2 GB limit forces it)
            save_as_external_data=not fits_in_protobuf(model),
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # not inferred: that loads the model
            metadata={"content_hash": content.content_hash, "preprocessing": manifest["preprocessing"],
                      "labels": manifest["labels"]})
    created["model_id"] = info.model_id
    client.log_batch(run_id, tags=[RunTag("force_compress.model_uri", info.model_uri)])

    _registered_model(client, name, config, created)
    s = report.sparsity
    tags = {"method": config.method, "structure": report.structure, "sparsity": f"{s.sparsity:.6g}",
            "target_sparsity": f"{config.sparsity:g}", "top1": f"{report.top1:.6g}", "top5": f"{report.top5:.6g}",
            "content_hash": content.content_hash, "source_sha256": manifest["source"]["sha256"]}
    description = (f"{config.method} ({report.structure}) at sparsity {s.sparsity:.4f}, top-1 {report.top1:.4f} on "
                   f"{report.n_val} held-out images; from {Path(config.model).name}")
    version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                          description=description, model_id=info.model_id)
    created["version"] = version.version
    return version


def figures(report) -> dict[str, float]:
    """The report's figures as MLflow metrics: the manifest's `figures`, and each published form's
    (`forms.<role>.top1`, `….size`, `….latency_ms.<batch>.p50`), flattened with '.'; numbers only."""
    s = report.sparsity
    tree = {"top1": report.top1, "top5": report.top5, "n_val": report.n_val, "sparsity": s.sparsity,
            "params_sparsity": s.params_sparsity, "prunable_zeros": s.prunable_zeros,
            "prunable_total": s.prunable_total, "parity_max_abs": report.parity_max_abs,
            "parity_max_rel": report.parity_max_rel, "effective_density": report.effective_density,
            "latency_ms": report.latency_ms, "sizes": report.sizes, "costs": report.costs,
            "forms": {f["role"]: {k: v for k, v in f.items() if k not in ("file", "role", "sha256", "primary")}
                      for f in artifact_records(report)}}
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[prefix] = float(value)

    walk("", tree)
    return out


def _published(client, name: str, content_hash: str):
    """The earliest model version of `name` tagged with this content hash, or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.content_hash = '{content_hash}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _result(name: str, version, content_hash: str, *, created: bool) -> PublishResult:
    uri = f"models:/{name}/{version.version}"
    return PublishResult(name, str(version.version), uri, uri, content_hash, created)


def _experiment(client, uri: str, database: Path | None) -> str:
    """The id of the experiment `force-compress`, created if missing (for sqlite, with its artifacts beside the
    database file rather than in the current directory)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        location = (database.resolve().parent / ARTIFACTS_DIR).as_uri() if database is not None else None
        try:
            return client.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException as e:  # created by another publisher meanwhile
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment.lifecycle_stage != "active":
        raise EnvironmentProblem(f"the MLflow experiment {EXPERIMENT!r} at {uri} is deleted; restore "
                                 f"it (mlflow experiments restore --experiment-id {experiment.experiment_id})")
    return experiment.experiment_id


def _registered_model(client, name: str, config, created: dict) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description=f"force-compress: pruned versions of {Path(config.model).name}")
        created["registered_model"] = name
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _undo(client, name: str, created: dict) -> str:
    """Delete what this call created, newest first; returns what could not be deleted ('' when all was)."""
    steps = []
    if "version" in created:
        steps.append((f"model version {name}/{created['version']}",
                      lambda: client.delete_model_version(name, created["version"])))
    if "registered_model" in created:  # only while it holds no version (another publisher may have added one)
        steps.append((f"registered model {name}", lambda: _delete_if_empty(client, name)))
    if "run_id" in created:
        steps.append((f"the models logged by run {created['run_id']}", lambda: _delete_logged_models(client, created)))
        steps.append((f"run {created['run_id']}", lambda: client.delete_run(created["run_id"])))
    left = []
    for i, (what, step) in enumerate(steps):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - best effort: say what is left
            left.append(what)
            if _is_environment(e):  # the store is gone: the other steps would only wait for it too
                left += [w for w, _ in steps[i + 1:]]
                break
    created.clear()
    return ", ".join(left)


def _delete_if_empty(client, name: str) -> None:
    if not client.search_model_versions(f"name = '{name}'"):
        client.delete_registered_model(name)


def _delete_logged_models(client, created: dict) -> None:
    run = client.get_run(created["run_id"])
    ids = {created.get("model_id")} | {m.model_id for m in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{created['run_id']}'")}
    for model_id in ids - {None}:
        client.delete_logged_model(model_id)


def _signature(model):
    """The model's input and output as MLflow tensor specs (symbolic dimensions as -1)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from onnx import helper

    def spec(value):
        t = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), shape, value.name)

    initializers = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return ModelSignature(Schema(inputs), Schema([spec(v) for v in model.graph.output]))


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """MLflow's flavours log into the active run of the global tracking URI: point it at `uri` for this call."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


@contextlib.contextmanager
def _http_limits():
    """Few, quick HTTP retries (see _HTTP_DEFAULTS) unless the user set them, for the span of one call."""
    added = {k: v for k, v in _HTTP_DEFAULTS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _is_environment(e: BaseException) -> bool:
    """A failure of the store or the way to it (not a bug of ours): the server went away, refused, timed out."""
    from mlflow.exceptions import MlflowException

    try:
        from requests import RequestException
    except ImportError:  # pragma: no cover - mlflow depends on requests
        RequestException = OSError  # noqa: N806
    return isinstance(e, MlflowException | RequestException | OSError | EnvironmentProblem)


def _reason(e: BaseException) -> str:
    """One short line: the OS error inside a client's message when there is one ('[Errno 111] Connection
    refused'), else the message's start."""
    if isinstance(e, EnvironmentProblem):
        return str(e)
    text = " ".join(str(e).split())
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno:
        return errno.group(0).strip()
    if "Read timed out" in text or "timed out" in text:
        return "timed out"
    return f"{type(e).__name__}: {text[:160]}"


register_target(Target("mlflow", PREFIX, check_mlflow_registry, publish_to_mlflow))
