"""Reuse and resume through the real `compress` command in a subprocess: a changed storage or gate reuses import, masks
and training from the same run directory; a run killed during training resumes from its checkpoint, to the same
file as a run never interrupted; a finished run keeps no checkpoint.pt unless asked. Also: each stage reads only the
config fields it declares (its cache key)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.compress import force_compress
from pipeline.config import ConfigView, UndeclaredFieldError, make_config
from stages.run.calls import StageCall, stage_key
from stages.run.checks import run_fingerprint
from stages.run.order import BY_NAME, STAGES

# Small, but with enough training (4 epochs of 26 batches) for a kill to land between two checkpoints.
ARGS = ["--sparsity", "0.9", "--epochs", "4", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
        "--min-accuracy", "0.15", "--no-prefect", "--json"]
FIRST_STAGES = ("import", "masks", "sparse-train")


def _command(model: str, *extra: str) -> list[str]:
    exe = Path(sys.executable).parent / "force-compress"  # the installed command users run
    return [str(exe), "compress", model, *ARGS, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _compress(model: str, cwd: Path, *extra: str) -> tuple[dict, str]:
    r = subprocess.run(_command(model, *extra), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), r.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return _sha(path), st.st_mtime_ns, st.st_ino


@pytest.fixture(scope="module")
def first_run(tiny_at_init, tmp_path_factory):
    """One uninterrupted run: (working directory, summary, run directory, sha256 of its model.sparse.onnx)."""
    cwd = tmp_path_factory.mktemp("first")
    summary, stderr = _compress(tiny_at_init, cwd)
    assert summary["reused"] == [] and "reused (cached)" not in stderr and "resuming" not in stderr
    run_dir = cwd / summary["run_dir"]
    return cwd, summary, run_dir, _sha(run_dir / "model.sparse.onnx")


def test_a_new_storage_and_gate_reuse_import_masks_and_training(tiny_at_init, first_run):
    cwd, first, run_dir, _ = first_run
    before = {n: _stamp(run_dir / n) for n in ("normalized.onnx", "masks.npz", "trained.pt")}

    again, stderr = _compress(tiny_at_init, cwd, "--storage", "sparse", "--min-accuracy", "0.2")

    for stage in FIRST_STAGES:
        assert f"{stage}: reused (cached)" in stderr, stderr
    assert again["reused"] == list(FIRST_STAGES)
    assert "[4/6] export ..." in stderr and "[5/6] validate ..." in stderr  # what the new settings change runs
    assert again["run_dir"] == first["run_dir"]
    assert {n: _stamp(run_dir / n) for n in before} == before  # not rewritten: same bytes, same file
    assert again["published"] and again["version"] == "v2"  # sparse storage: a new file, a new version
    reused_s = sum(again["stage_seconds"][s] for s in ("masks", "sparse-train"))
    assert reused_s < 0.1 * sum(first["stage_seconds"][s] for s in ("masks", "sparse-train")), again["stage_seconds"]


def test_a_run_killed_during_training_resumes_to_the_same_model(tiny_at_init, first_run, tmp_path):
    _, first, _, uninterrupted_sha = first_run
    proc = subprocess.Popen(_command(tiny_at_init), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("runs/*/checkpoint.pt")):  # the first epoch is done
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint.pt within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    run_dir = tmp_path / first["run_dir"]
    assert not (run_dir / "trained.pt").exists(), "killed too late: training had finished"

    summary, stderr = _compress(tiny_at_init, tmp_path, "--keep-checkpoint")

    assert "import: reused (cached)" in stderr and "masks: reused (cached)" in stderr, stderr
    assert "sparse-train: reused" not in stderr
    epoch = int(re.search(r"resuming from epoch (\d+) of 4", stderr).group(1))
    assert 1 <= epoch < 4
    assert summary["reused"] == ["import", "masks"] and summary["run_dir"] == first["run_dir"]
    assert _sha(run_dir / "model.sparse.onnx") == uninterrupted_sha
    assert (run_dir / "checkpoint.pt").exists()  # --keep-checkpoint
    assert not list(run_dir.glob(".checkpoint.pt.*"))  # nor the temporary file of a save the kill cut short


def test_a_finished_run_drops_its_checkpoint(first_run):
    _, _, run_dir, _ = first_run
    assert (run_dir / "trained.pt").exists() and not (run_dir / "checkpoint.pt").exists()
    assert not list(run_dir.glob("*.pt.*"))


# --- what each stage reads is what its key hashes ------------------------------------------------------------


def test_a_stage_reading_an_undeclared_field_fails(tiny_at_init):
    config = make_config(model=tiny_at_init)
    view = ConfigView(config, BY_NAME["export"].reads)
    assert view.storage == "dense" and view.density == pytest.approx(0.1)  # declared, and derived from declared
    with pytest.raises(UndeclaredFieldError, match="config.epochs is read but not declared"):
        view.epochs  # noqa: B018
    with pytest.raises(UndeclaredFieldError):
        view.model_dump()
    with pytest.raises(UndeclaredFieldError):
        view.model_name  # needs `name` and `model`  # noqa: B018


def test_keys_follow_the_declared_fields_only(tiny_at_init, tmp_path):
    base = make_config(model=tiny_at_init)
    changed = base.model_copy(update={"storage": "sparse", "min_accuracy": 0.9, "max_drop": 0.1, "name": "x",
                                      "quantize": "int8", "registry": "elsewhere", "keep_checkpoint": True})
    assert run_fingerprint(changed) == run_fingerprint(base)  # same run directory
    assert run_fingerprint(base.model_copy(update={"epochs": 3})) != run_fingerprint(base)
    assert run_fingerprint(base.model_copy(update={"parity_tol": 1e-3})) == run_fingerprint(base)  # a check only

    def key(config, stage="masks"):
        return stage_key(StageCall(BY_NAME[stage], {"run_dir": str(tmp_path),
                                                    "config": ConfigView(config, BY_NAME[stage].reads)}))

    assert key(changed) == key(base)
    assert key(base.model_copy(update={"sparsity": 0.5})) != key(base)
    assert key(changed, "export") != key(base, "export")
    assert all("keep_checkpoint" not in s.reads for s in STAGES if s.reads is not None)


# --- the same through the Prefect flow ------------------------------------------------------------------------


@pytest.fixture
def prefect_log():
    """The INFO lines of the flow's and its tasks' run loggers."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    handler, levels = Keep(level=logging.INFO), [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield lines
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_the_flow_reuses_and_resumes_the_same_way(prefect_harness, prefect_log, tiny_at_init, tmp_path):
    params = dict(model=tiny_at_init, sparsity=0.9, epochs=2, steps=2, mask_batch_size=64, batch_size=64,
                  min_accuracy=0.15, registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"),
                  keep_checkpoint=True)
    first = force_compress(**params)
    run_dir = Path(first["run_dir"])
    before = {n: _stamp(run_dir / n) for n in ("masks.npz", "trained.pt")}
    assert first["reused"] == [] and (run_dir / "checkpoint.pt").exists()

    prefect_log.clear()
    again = force_compress(**{**params, "storage": "sparse", "max_drop": 0.5, "baseline_accuracy": 0.5})
    assert again["reused"] == list(FIRST_STAGES) and again["run_dir"] == first["run_dir"]
    assert {n: _stamp(run_dir / n) for n in before} == before
    assert any("import: reused (cached)" in line for line in prefect_log), prefect_log

    (run_dir / "trained.pt").unlink()  # training's output gone, its checkpoint kept: training resumes from it
    prefect_log.clear()
    third = force_compress(**{**params, "keep_checkpoint": False})
    assert third["reused"] == ["import", "masks"]
    assert any("resuming from epoch 2 of 2" in line for line in prefect_log), prefect_log
    assert (run_dir / "trained.pt").exists() and not (run_dir / "checkpoint.pt").exists()
