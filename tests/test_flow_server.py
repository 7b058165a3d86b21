"""Integration: a real Prefect server on loopback, the deployments served by `force-compress serve`, runs
triggered with `prefect deployment run force-compress/force-compress` and `force-compress-sweep/force-compress-sweep`,
and the published models checked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, check, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[:3]} exited with {p.returncode} while waiting for {what}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_served_deployment_runs_from_prefect_deployment_run(tiny_at_init, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONWARNINGS": "ignore"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "serve")}  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-ui", "--analytics-off"], env=env, cwd=tmp_path, stdout=logs["server"],
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        _wait_for("the Prefect server", lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200,
                  90, procs)

        serve = subprocess.Popen([str(BIN / "force-compress"), "serve"], env=env, cwd=tmp_path, stdout=logs["serve"],
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(serve)
        _wait_for("the served deployment", lambda: _post(f"{api}/deployments/filter", {
            "deployments": {"name": {"any_": ["force-compress"]}}}), 90, procs)

        registry = tmp_path / "registry"
        params = {"model": tiny_at_init, "sparsity": 0.9, "epochs": 1, "steps": 2, "mask_batch_size": 64,
                  "batch_size": 64, "min_accuracy": 0.15, "registry": str(registry), "runs_dir": str(tmp_path / "runs")}
        args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()]
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "force-compress/force-compress",
             *[a for kv in args for a in ("--param", kv)], "--watch", "--watch-timeout", "240"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert "Completed" in run.stdout + run.stderr

        manifest = json.loads((registry / "tiny" / "v1" / "manifest.json").read_text())
        assert manifest["figures"]["sparsity"] >= 0.9 - 1 / 1928
        assert (registry / "tiny" / "v1" / "model.onnx").stat().st_size > 0

        # The same `serve` serves the sweep: two cells, the sparsest passing one published.
        sweep_registry = tmp_path / "sweep-registry"
        params = {**params, "registry": str(sweep_registry), "min_accuracy": 0.0}
        params.pop("sparsity")
        args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()]
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "force-compress-sweep/force-compress-sweep",
             *[a for kv in args for a in ("--param", kv)], "--param", "sparsities=[0.5, 0.8]",
             "--watch", "--watch-timeout", "240"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        manifest = json.loads((sweep_registry / "tiny" / "v1" / "manifest.json").read_text())
        assert manifest["config"]["sparsity"] == 0.8
        assert [p.name for p in (sweep_registry / "tiny").iterdir() if p.name.startswith("v")] == ["v1"]
    except AssertionError:
        for name, f in logs.items():
            f.flush()
            print(f"--- {name} log ---\n" + (tmp_path / f"{name}.log").read_text()[-4000:])
        raise
    finally:
        for p in reversed(procs):
            _stop(p)
        for f in logs.values():
            f.close()


pytestmark = pytest.mark.timeout(420)
