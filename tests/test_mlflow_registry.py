"""`--registry mlflow:URI` against real MLflow backends: a SQLite store under tmp_path and a real `mlflow server` on
loopback. A published version loads with mlflow.onnx and gives the exported file's outputs, the same content is
registered once, and an unreachable or dying server is exit 3 with nothing half-registered."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import make_config
from pipeline.errors import EnvironmentProblem
from stages.measure.report import load_report
from stages.publish import publish
from stages.publish.mlflow_registry import EXPERIMENT
from stages.publish.mlflow_registry import _tracking_uri as _tracking  # the flavour loads through the global URI

TINY = ["--sparsity", "0.9", "--epochs", "1", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
        "--min-accuracy", "0.15"]
EXE = Path(sys.executable).parent / "force-compress"  # the installed command users run


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(EXE), "compress", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


class Server:
    """A real `mlflow server` on a free loopback port, in its own process group (uvicorn runs in a child)."""

    def __init__(self, store: Path):
        store.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = f"sqlite:///{store / 'mlflow.db'}"
        self.log = open(store / "server.log", "w")  # noqa: SIM115 - closed in stop()
        # no job runner: it only serves MLflow's GenAI jobs, and starts seven more processes
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", self.db, "--artifacts-destination", str(store / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: {Path(self.log.name).read_text()}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{self.uri}/health", timeout=1).status == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not up after {timeout} s: {Path(self.log.name).read_text()[-2000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started at once (each takes ~6 s to come up): one for the tests, one to kill."""
    started = {k: Server(tmp_path_factory.mktemp(f"mlflow-{k}")) for k in ("main", "doomed")}
    yield started
    for s in started.values():
        if s.proc.poll() is None:
            s.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def compressed(servers, tiny_at_init, tmp_path_factory):
    """`force-compress compress --registry mlflow:sqlite:///…` through the real CLI (plain path): its summary,
    the SQLite tracking URI, and the directory it ran in."""
    cwd = tmp_path_factory.mktemp("compress")
    db = cwd / "store" / "mlflow.db"  # the store's directory does not exist yet: publish creates it
    t = time.perf_counter()
    r = _cli([tiny_at_init, *TINY, "--no-prefect", "--json", "--registry", f"mlflow:sqlite:///{db}"], cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"compress to an MLflow SQLite store: {time.perf_counter() - t:.1f} s")
    return json.loads(r.stdout), f"sqlite:///{db}", cwd


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(uri: str, deleted: bool = False) -> list:
    from mlflow.entities import ViewType

    client = _client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment.experiment_id], run_view_type=view)


def _outputs(model_or_path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _images(n: int = 64) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def _published_run(compressed, registry: str, monkeypatch):
    """The compressed run's directory, report and config, pointed at another registry (publish in-process, in the
    directory the CLI ran in: the report's paths are relative to it)."""
    summary, _, cwd = compressed
    monkeypatch.chdir(cwd)
    run_dir = cwd / summary["run_dir"]
    config = make_config(**{**json.loads((run_dir / "config.json").read_text()), "registry": registry})
    return run_dir, load_report(run_dir / "report.json"), config


def test_compress_registers_a_version_that_loads_with_the_exported_outputs(compressed, record_property):
    import mlflow.onnx

    summary, uri, cwd = compressed
    assert summary["published"] and summary["exit_code"] == 0
    assert (summary["version"], summary["registry_path"]) == ("1", "models:/tiny/1")
    exported = cwd / summary["run_dir"] / "model.sparse.onnx"
    with _tracking(uri):
        model = mlflow.onnx.load_model("models:/tiny/1")
    diff = float(np.abs(_outputs(model, _images()) - _outputs(exported, _images())).max())
    print(f"models:/tiny/1 (SQLite) vs the exported file: max abs difference {diff}")
    record_property("sqlite_load_model_max_abs_diff", diff)
    assert diff == 0.0
    assert model.SerializeToString() == exported.read_bytes()  # the very bytes, not just the same outputs
    # artifacts beside the database, not in the current directory
    assert (cwd / "store" / "mlartifacts").is_dir() and not (cwd / "mlruns").exists()


def test_the_version_carries_tags_params_metrics_and_the_report_files(compressed):
    summary, uri, cwd = compressed
    client = _client(uri)
    version = client.get_model_version("tiny", "1")
    report = json.loads((cwd / summary["run_dir"] / "report.json").read_text())
    assert version.tags["method"] == "force" and version.tags["structure"] == "unstructured"
    assert float(version.tags["sparsity"]) == pytest.approx(summary["sparsity"], abs=1e-6)
    assert float(version.tags["top1"]) == pytest.approx(summary["top1"], abs=1e-6)
    assert len(version.tags["content_hash"]) == 64
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["sparsity"] == "0.9" and run.data.params["epochs"] == "1"
    assert run.data.params["method"] == "force" and run.data.params["registry"].startswith("mlflow:sqlite:///")
    m = run.data.metrics
    assert m["top1"] == pytest.approx(summary["top1"]) and m["top5"] == pytest.approx(summary["top5"])
    assert m["sparsity"] == pytest.approx(summary["sparsity"])
    assert m["parity_max_abs"] == pytest.approx(report["parity_max_abs"])
    assert m["sizes.exported"] == summary["sizes"]["exported"]
    assert m["latency_ms.exported.p50"] == pytest.approx(summary["latency_ms"]["exported"]["p50"])
    assert m["forms.fp32.top1"] == pytest.approx(summary["top1"]) and "forms.fp32.latency_ms.1.p50" in m
    files = {f.path for f in client.list_artifacts(run.info.run_id, "version")}
    assert {f"version/{n}" for n in ("report.json", "report.md", "report.png", "masks.npz", "masks.json",
                                     "manifest.json")} <= files
    manifest = json.loads(Path(client.download_artifacts(run.info.run_id, "version/manifest.json")).read_text())
    assert manifest["content_hash"] == version.tags["content_hash"] and manifest["figures"]["top1"] == summary["top1"]


def test_the_same_content_again_is_the_same_version_and_no_new_run(compressed, monkeypatch):
    _, uri, _ = compressed
    run_dir, report, config = _published_run(compressed, f"mlflow:{uri}", monkeypatch)
    runs_before = len(_runs(uri))

    again = publish(run_dir, report, config)

    assert (again.version, again.created, again.path) == ("1", False, "models:/tiny/1")
    assert [v.version for v in _client(uri).search_model_versions("name = 'tiny'")] == [1]
    assert len(_runs(uri)) == runs_before == 1


def test_a_tracking_server_gets_the_same_version_once_and_it_loads(compressed, servers, record_property, monkeypatch):
    import mlflow.onnx

    server = servers["main"].wait_ready()
    run_dir, report, config = _published_run(compressed, f"mlflow:{server.uri}", monkeypatch)

    first, again = publish(run_dir, report, config), publish(run_dir, report, config)

    assert (first.version, first.created, again.version, again.created) == ("1", True, "1", False)
    assert first.content_hash == again.content_hash
    assert len(_runs(server.uri)) == 1
    with _tracking(server.uri):
        model = mlflow.onnx.load_model("models:/tiny/1")
    diff = float(np.abs(_outputs(model, _images()) - _outputs(report.exported_path, _images())).max())
    print(f"models:/tiny/1 (server) vs the exported file: max abs difference {diff}")
    record_property("server_load_model_max_abs_diff", diff)
    assert diff == 0.0
    version = _client(server.uri).get_model_version("tiny", "1")
    assert version.tags["content_hash"] == first.content_hash and version.tags["method"] == "force"


def test_an_unreachable_server_is_exit_3_with_one_line_within_seconds(tiny_at_init, tmp_path, record_property):
    t = time.perf_counter()
    r = _cli([tiny_at_init, *TINY, "--no-prefect", "--registry", "mlflow:http://127.0.0.1:9"], tmp_path, timeout=60)
    seconds = time.perf_counter() - t

    print(f"unreachable MLflow server: exit {r.returncode} after {seconds:.1f} s: {r.stderr.strip()}")
    record_property("unreachable_exit_3_seconds", round(seconds, 2))
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no MLflow tracking server answers at http://127.0.0.1:9")
    assert "Connection refused" in lines[0]
    assert seconds < 30
    assert not (tmp_path / "runs").exists()  # checked before any work


@pytest.mark.parametrize("registry, message", [
    ("mlflow:", "needs a tracking URI"),
    ("mlflow:ftp://host/x", "unsupported MLflow URI"),
    ("mlflow:sqlite://", "names no database file"),
    ("mlflow:sqlite:///{not_a_db}", "is not an SQLite database"),
    ("mlflow:sqlite:///{file}/sub/mlflow.db", "is not a directory"),
])
def test_a_bad_mlflow_uri_is_exit_2_with_one_line(registry, message, tiny_at_init, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a database\n")
    registry = registry.format(not_a_db=tmp_path / "notes.txt", file=tmp_path / "notes.txt")
    r = CliRunner().invoke(main, ["compress", tiny_at_init, *TINY, "--no-prefect", "--registry", registry])

    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_server_killed_mid_publish_is_exit_3_and_registers_nothing(compressed, servers, monkeypatch):
    import mlflow.onnx

    server = servers["doomed"].wait_ready()
    run_dir, report, config = _published_run(compressed, f"mlflow:{server.uri}", monkeypatch)
    log_model = mlflow.onnx.log_model

    def crash_then_log(*args, **kwargs):  # the server dies after the run and its files, before the model
        server.kill()
        return log_model(*args, **kwargs)

    monkeypatch.setattr(mlflow.onnx, "log_model", crash_then_log)
    t = time.perf_counter()
    with pytest.raises(EnvironmentProblem, match=r"nothing was registered; left behind.*: .*run ") as e:
        publish(run_dir, report, config)
    print(f"server killed mid-publish: EnvironmentProblem after {time.perf_counter() - t:.1f} s: {e.value}")
    assert "\n" not in str(e.value)

    # The server's own store, read directly: no registered model, no version; the one run it holds never finished.
    client = _client(server.db)
    assert client.search_registered_models() == [] and client.search_model_versions("name = 'tiny'") == []
    assert [r.info.status for r in _runs(server.db)] == ["RUNNING"]


def test_an_interrupted_publish_deletes_what_it_created(compressed, tmp_path, monkeypatch):
    import mlflow.onnx

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, report, config = _published_run(compressed, f"mlflow:{uri}", monkeypatch)
    log_model = mlflow.onnx.log_model

    def log_then_interrupt(*args, **kwargs):  # Ctrl-C once the model is logged, before it is registered
        log_model(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.onnx, "log_model", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        publish(run_dir, report, config)

    client = _client(uri)
    assert client.search_registered_models() == [] and client.search_model_versions("name = 'tiny'") == []
    assert _runs(uri) == [] and len(_runs(uri, deleted=True)) == 1
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert list(client.search_logged_models([experiment.experiment_id])) == []

    monkeypatch.setattr(mlflow.onnx, "log_model", log_model)  # the next publish of it registers it afresh
    result = publish(run_dir, report, config)
    assert (result.version, result.created) == ("1", True)
