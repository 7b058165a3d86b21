"""Faults a delivery pipeline meets, through the real CLI in a subprocess: signals during publish, a full or
unwritable disk, names the file system refuses, external data found from the model's directory, and `--json`
answering every exit code with one object."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "force-compress"
TINY = ["--sparsity", "0.9", "--epochs", "1", "--max-steps", "2", "--steps", "2", "--mask-batch-size", "64",
        "--batch-size", "64", "--min-accuracy", "0.0"]


def _env():
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _run(args, cwd, timeout=300):
    return subprocess.run([str(EXE), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _answer(r) -> dict:
    """The one JSON object a `--json` run prints on stdout."""
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(lines[0])


def _error_line(r) -> str:
    """The run's last stderr line: its one-line error; no traceback anywhere."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A 30 MB classifier of 8x8 digits: its publish copies long enough for a signal to land inside it."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 100_000), nn.ReLU(), nn.Linear(100_000, 10)).eval()
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    torch.onnx.export(module, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


def _signal_during_publish(args, cwd: Path, registry: Path, sig: int):
    """Start compress, send `sig` the moment a staging folder holds the model file, return (process, stdout,
    stderr)."""
    p = subprocess.Popen([str(EXE), *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    sent = False
    while p.poll() is None and not sent:
        if any(registry.glob("*/.staging-*/model.onnx")):
            p.send_signal(sig)
            sent = True
        time.sleep(0.0005)
    out, err = p.communicate(timeout=300)
    assert sent, f"the run ended before its publish was seen: {err[-2000:]}"
    return p, out, err


def _check_registry(registry: Path, name: str) -> list[str]:
    """Every entry of registry/name is a complete version (every manifest hash matches its file) or its
    bookkeeping (.lock, LATEST); returns the versions."""
    from pipeline.artifacts import sha256_file

    root = registry / name
    entries = sorted(p.name for p in root.iterdir())
    versions = [e for e in entries if e.startswith("v")]
    assert set(entries) - set(versions) <= {".lock", "LATEST"}, entries
    for v in versions:
        manifest = json.loads((root / v / "manifest.json").read_text())
        for file, digest in manifest["files"].items():
            assert sha256_file(root / v / file) == digest, (v, file)
    return versions


def test_sigterm_and_sigkill_during_publish_then_a_rerun_leave_complete_versions_only(tmp_path, big_model):
    registry = tmp_path / "registry"
    args = ["compress", str(big_model), *TINY, "--json"]

    # SIGTERM (CI cancellation) through the Prefect flow, as a user runs it: exit 143, no staging folder left
    p, out, err = _signal_during_publish(args, tmp_path, registry, signal.SIGTERM)
    assert p.returncode == 143, err[-3000:]
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["exit_code"] == 143 and answer["error"] == "interrupted" and answer["run_dir"]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert not [p.name for p in (registry / "big").iterdir() if p.name != ".lock"]

    # SIGKILL cannot be caught: the staging folder stays behind, its lock released by the kernel
    p, _, err = _signal_during_publish([*args, "--no-prefect"], tmp_path, registry, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    left = [p.name for p in (registry / "big").glob(".staging-*")]
    assert any(not n.endswith(".lock") for n in left), left

    r = _run([*args, "--no-prefect"], tmp_path)  # the next publish removes what the killed one left
    assert r.returncode == 0, r.stderr[-3000:]
    assert _answer(r)["message"] == "published big v1"
    assert _check_registry(registry, "big") == ["v1"]


def test_a_staging_folder_in_use_is_never_removed(tmp_path):
    from stages.publish.directory import _staging, remove_abandoned_staging

    with _staging(tmp_path) as in_use:
        (in_use / "model.onnx").write_bytes(b"x")
        abandoned = tmp_path / ".staging-killed0"
        abandoned.mkdir()
        (tmp_path / ".staging-killed0.lock").touch()  # its process died: nobody holds the lock
        assert remove_abandoned_staging(tmp_path) == [".staging-killed0"]
        assert (in_use / "model.onnx").is_file() and not abandoned.exists()
        assert not (tmp_path / ".staging-killed0.lock").exists()
        with open(f"{in_use}.lock") as f:  # another process's view: the lock is held
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_not_1(tmp_path, tiny_at_init):
    p = subprocess.Popen([str(EXE), "compress", tiny_at_init, *TINY[:-4], "--epochs", "50", "--no-prefect", "--json"],
                         cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not any(runs.glob("*/history.json")):  # training is under way
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert json.loads(out)["error"] == "interrupted" and "interrupted by SIGINT" in err
    assert "Traceback" not in err


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *, read_only: bool = False):
    """A real small file system at `path` (needs root and mount rights: skipped without them)."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_that_fills_up_during_the_run_exits_3_with_one_line(tmp_path, tiny_at_init):
    with _tmpfs(tmp_path / "disk", "40m") as disk:
        registry = disk / "registry"
        p = subprocess.Popen([str(EXE), "compress", tiny_at_init, *TINY, "--no-prefect", "--json",
                              "--registry", str(registry)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        runs = tmp_path / "runs"
        while p.poll() is None and not any(runs.glob("*/model.sparse.onnx")):
            time.sleep(0.01)
        with open(disk / "filler", "wb") as f:  # another job fills the disk after the up-front check passed
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        out, err = p.communicate(timeout=300)
        assert p.returncode == 3, err[-3000:]
        line = _error_line(type("R", (), {"stderr": err})())
        assert line.startswith("error: no space left on the device writing ") and str(registry) in line
        answer = json.loads(out)
        assert answer["exit_code"] == 3 and answer["error"] == "environment_problem"
        assert "Traceback" in (Path(answer["run_dir"]) if Path(answer["run_dir"]).is_absolute()
                               else tmp_path / answer["run_dir"]).joinpath("error.txt").read_text()
        assert [p.name for p in (registry / "tiny").iterdir() if p.name != ".lock"] == []


def test_too_little_space_or_a_read_only_registry_stops_before_any_work(tmp_path, tiny_at_init, big_model):
    with _tmpfs(tmp_path / "small", "20m") as small:
        r = _run(["compress", str(big_model), *TINY, "--no-prefect", "--registry", str(small / "reg")], tmp_path)
        assert r.returncode == 3
        assert "MB free on its file system, the run needs about" in _error_line(r)
        assert not (tmp_path / "runs").exists() and not (small / "reg").exists()
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        r = _run(["compress", tiny_at_init, *TINY, "--no-prefect", "--registry", str(ro / "reg")], tmp_path)
        assert r.returncode == 3
        assert "is not writable" in _error_line(r)


def test_a_name_longer_than_the_file_system_allows_exits_3_before_any_work(tmp_path, tiny_at_init):
    r = _run(["compress", tiny_at_init, *TINY, "--no-prefect", "--json", "--registry", str(tmp_path / ("r" * 300))],
             tmp_path)
    assert r.returncode == 3
    assert "longer than the 255 the file system allows" in _error_line(r)
    assert _answer(r) == {"exit_code": 3, "error": "environment_problem", "message": _error_line(r)[len("error: "):],
                          "run_dir": None}
    assert not (tmp_path / "runs").exists()


def test_external_data_is_read_from_the_models_directory_not_the_working_directory(tmp_path, tiny_at_init):
    import onnx

    models = tmp_path / "models"
    models.mkdir()
    onnx.save(onnx.load(tiny_at_init), str(models / "x.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="x.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "jobs"
    elsewhere.mkdir()
    r = _run(["compress", "../models/x.onnx", *TINY, "--no-prefect", "--json"], elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _answer(r)["message"] == "published x v1"


@pytest.mark.parametrize("args, code, kind", [
    (["--sparsity", "abc"], 2, "usage"),
    (["--sparsity", "1.5"], 2, None),
    (["--data", "npz:/nonexistent.npz"], 2, "data"),
    (["--min-accuracy", "1.0"], 1, "gate_failed"),
])
def test_json_answers_every_exit_code_with_one_object(tmp_path, tiny_at_init, args, code, kind):
    r = _run(["compress", tiny_at_init, *TINY, "--no-prefect", "--json", *args], tmp_path)
    assert r.returncode == code, r.stderr[-3000:]
    answer = _answer(r)
    assert answer["exit_code"] == code and answer["message"]
    assert set(answer) >= {"exit_code", "error", "message", "run_dir"}
    if kind:
        assert answer["error"] == kind
