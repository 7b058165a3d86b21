"""The CLI contract CI jobs rely on, through the real command in a subprocess: each documented failure gets its exit
code and one line before any work, and a normal run through Prefect prints no traceback or ERROR line offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

EXE = Path(sys.executable).parent / "force-compress"
TINY = ["--sparsity", "0.9", "--epochs", "1", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
        "--min-accuracy", "0.05"]


def _run(args, cwd, env=None, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def _with_external_data(src: str, dest: Path) -> Path:
    onnx.save(onnx.load(src), str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dest.name + ".data", size_threshold=0)
    return dest


def test_a_model_with_two_outputs_exits_2_before_any_work(tmp_path, to_onnx):
    import torch.nn as nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(256, 10)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(h.flatten(1)), h

    import torch

    path = tmp_path / "two.onnx"
    torch.onnx.export(Two().eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits", "features"], dynamic_axes={"input": {0: "N"}})

    r = _run(["compress", str(path), *TINY, "--no-prefect"], tmp_path)

    assert r.returncode == 2
    assert "one output" in _one_line(r) and "['logits', 'features']" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()


@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_missing_external_data_exits_2_naming_the_file(command, tiny_at_init, tmp_path):
    model = _with_external_data(tiny_at_init, tmp_path / "ext.onnx")
    (tmp_path / "ext.onnx.data").unlink()

    r = _run([command, str(model), *(TINY + ["--no-prefect"] if command == "compress" else [])], tmp_path)

    assert r.returncode == 2
    assert "'ext.onnx.data'" in _one_line(r) and "beside the model" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_serve_without_a_reachable_prefect_api_exits_3(tmp_path):
    r = _run(["serve"], tmp_path, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}, timeout=60)

    assert r.returncode == 3
    assert "no Prefect API answers at http://127.0.0.1:9/api" in _one_line(r)


def test_compress_help_lists_every_exit_code(tmp_path):
    out = _run(["compress", "--help"], tmp_path).stdout
    for code, words in ((0, "published"), (1, "gate failed"), (2, "bad input"), (3, "environment"), (4, "internal")):
        assert any(line.strip().startswith(f"{code}  ") and words in line for line in out.splitlines()), out


def test_a_prefect_run_offline_is_quiet_and_counts_external_data_in_sizes(tiny_at_init, tmp_path):
    model = _with_external_data(tiny_at_init, tmp_path / "ext.onnx")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}

    r = subprocess.run([str(EXE), "compress", str(model), *TINY, "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)

    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "| ERROR" not in r.stderr, r.stderr[-3000:]
    s = json.loads(r.stdout)
    on_disk = model.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert s["sizes"]["input"] == on_disk > model.stat().st_size
