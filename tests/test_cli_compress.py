"""`force-compress compress` end to end in a subprocess (plain and through the Prefect flow), its exit codes,
and bad input: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main

TINY = ["--sparsity", "0.9", "--epochs", "1", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
        "--min-accuracy", "0.15"]


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PREFECT_LOGGING_LEVEL": "INFO"}
    exe = Path(sys.executable).parent / "force-compress"  # the installed command users run
    return subprocess.run([str(exe), "compress", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _versions(registry: Path) -> list[str]:
    return sorted(str(p.relative_to(registry)) for p in registry.glob("*/v*"))


def test_compress_without_prefect_publishes_and_prints_one_json_summary(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, *TINY, "--no-prefect", "--json"], tmp_path)

    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout holds the summary and nothing else
    assert summary["published"] and summary["version"] == "v1" and summary["exit_code"] == 0
    assert summary["sparsity"] >= 0.9 - 1 / 1928 and summary["top1"] >= 0.15
    report = json.loads((tmp_path / summary["run_dir"] / "report.json").read_text())
    assert 0 < summary["effective_density"] == report["effective_density"] <= 1 - summary["sparsity"] + 1e-9
    assert report["cut_layers"] == [] and "effective density" in (tmp_path / report["report_md"]).read_text()
    assert list(summary["stage_seconds"]) == ["import", "masks", "sparse-train", "export", "validate", "publish"]
    for i, stage in enumerate(summary["stage_seconds"], 1):
        assert f"[{i}/6] {stage}" in r.stderr
    assert _versions(tmp_path / "registry") == ["tiny/v1"]
    manifest = json.loads((tmp_path / "registry/tiny/v1/manifest.json").read_text())
    assert manifest["figures"]["sparsity"] == summary["sparsity"]


def test_compress_through_the_prefect_flow_publishes(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, *TINY], tmp_path)

    assert r.returncode == 0, r.stderr[-3000:]
    assert "published tiny v1" in r.stdout and "exported ÷ input" in r.stdout
    assert _versions(tmp_path / "registry") == ["tiny/v1"]
    assert "stage validate" in r.stderr  # the run logger's progress lines


def test_a_failed_gate_exits_1_and_publishes_nothing(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, *TINY, "--min-accuracy", "1.0", "--epochs", "0", "--no-prefect"], tmp_path)

    assert r.returncode == 1, r.stderr[-3000:]
    assert "gate FAILED" in r.stdout and "short by" in r.stdout
    assert _versions(tmp_path / "registry") == []
    assert (next((tmp_path / "runs").iterdir()) / "report.md").exists()  # the report says why


def _bad_inputs(tmp: Path, model: str) -> dict[str, tuple[list[str], str]]:
    (tmp / "notes.txt").write_text("not a model")
    (tmp / "afile").write_text("")
    np.savez(tmp / "labels.npz", x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20))  # 20 classes, model has 10
    return {
        "missing file": ([str(tmp / "nope.onnx")], "no such file"),
        "not onnx": ([str(tmp / "notes.txt")], "not"),
        "sparsity 1": ([model, "--sparsity", "1.0"], "sparsity"),
        "sparsity 0": ([model, "--sparsity", "0"], "sparsity"),
        "unknown method": ([model, "--method", "prune_it_all"], "unknown method 'prune_it_all'"),
        "data misfit": ([model, "--data", f"npz:{tmp / 'labels.npz'}"], "label 19 but the model has 10 outputs"),
        "unknown data": ([model, "--data", "mnist"], "unknown data spec"),
        "registry under a file": ([model, "--registry", str(tmp / "afile" / "reg")], "not a directory"),
        "registry is a file": ([model, "--registry", str(tmp / "afile")], "not a directory"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "not onnx", "sparsity 1", "sparsity 0", "unknown method", "data misfit", "unknown data",
    "registry under a file", "registry is a file"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_at_init, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, message = _bad_inputs(inputs, tiny_at_init)[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # runs/ and registry/ default to the working directory

    r = CliRunner().invoke(main, ["compress", *args, "--no-prefect"])

    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert list(work.iterdir()) == []


def test_cuda_asked_for_without_a_cuda_device_is_an_environment_problem(tiny_at_init, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["compress", tiny_at_init, "--device", "cuda"])
    assert r.exit_code == 3 and "no CUDA device" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_input_in_a_real_subprocess_through_the_default_flow_path(tiny_at_init, tmp_path):
    # The same promise without --no-prefect and outside click's test runner: what a CI step sees.
    r = _cli([tiny_at_init, "--sparsity", "1.5"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "sparsity" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = _cli([str(tmp_path / "missing.onnx")], tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
