"""`force-compress sweep` and the flow `force-compress-sweep`: the dense baseline, one cached cell per method and
sparsity, the Pareto table and plot, the sparsest passing cell published, exit codes, and bad sparsity lists."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import BadInputError
from stages.run.sweep import (
    Cell,
    SweepResult,
    choose,
    pareto_front,
    parse_methods,
    parse_sparsities,
    table_markdown,
    write_pareto_plot,
)

FAST = ["--epochs", "2", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64"]


def _sweep(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PREFECT_LOGGING_LEVEL": "INFO"}
    exe = Path(sys.executable).parent / "force-compress"
    return subprocess.run([str(exe), "sweep", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cell(method="force", target=0.9, sparsity=0.9, top1=0.8, passed=True, size=100) -> Cell:
    return Cell(method, target, sparsity, top1, None, passed, (), size, "model.onnx", size, 1.0, 10.0, None, "r")


def test_sparsity_lists_are_parsed_sorted_and_checked():
    assert parse_sparsities("0.99, 0.9,0.95,0.9") == (0.9, 0.95, 0.99)
    assert parse_sparsities([0.5]) == (0.5,)
    for bad, words in (("", "empty"), (" , ", "empty"), ("0.9,1.0", "out of range"), ("0", "out of range"),
                       ("0.9,abc", "not a number"), ("nan", "out of range"), ("-0.5", "out of range")):
        with pytest.raises(BadInputError, match=words):
            parse_sparsities(bad)
    assert parse_methods("force, iter_snip,force") == ("force", "iter_snip")
    with pytest.raises(BadInputError, match="empty"):
        parse_methods(",")


def test_the_frontier_keeps_only_undominated_cells_and_the_sparsest_passing_cell_is_chosen():
    points = [(10, 0.9), (5, 0.85), (5, 0.80), (2, 0.5), (12, 0.9), (1, 0.2)]
    assert pareto_front(points) == [5, 3, 1, 0]  # by cost; (5, .80) and (12, .9) are beaten
    cells = [_cell(target=0.9, top1=0.95), _cell(target=0.99, top1=0.6, passed=False),
             _cell(target=0.98, sparsity=0.9801, top1=0.90), _cell("iter_snip", 0.98, 0.9799, top1=0.93)]
    assert choose(cells) == 3  # the highest target that passed; between methods, the better top-1
    assert choose([_cell(passed=False)]) is None


def test_a_cell_stopped_before_training_is_a_failed_row_and_no_point(tmp_path):
    cut = Cell("force", 0.999, 0.999, 0.0, None, False, ("the masks cut the network: 3 layer(s) keep no weight",),
               None, None, None, None, None, None, "r3")
    cells = (_cell(target=0.9, top1=0.9), _cell(target=0.99, top1=0.7, size=20), cut)
    result = SweepResult(str(tmp_path), "m.onnx", "m", {"top1": 0.92, "source": "test"}, 0.6, cells, 1,
                         {"name": "m", "version": "v1", "path": "registry/m/v1", "created": True},
                         str(tmp_path / "sweep.md"), str(tmp_path / "pareto.png"), str(tmp_path / "sweep.json"))
    table = table_markdown(result)
    assert "| force@0.99 (published) |" in table and "| force@0.999 |" in table
    assert "FAIL: the masks cut the network" in table
    write_pareto_plot(result, result.plot_png)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_bad_sparsity_lists_exit_2_with_one_line_before_any_work(tiny_at_init, tmp_path):
    r = _sweep([tiny_at_init, "--sparsities", "0.9,1.5", "--no-prefect"], tmp_path, timeout=60)  # the real CLI
    assert r.returncode == 2 and r.stderr.startswith("error: --sparsities"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for args, message in ((["--sparsities", ""], "error: --sparsities"),
                          (["--sparsities", "0.9;0.95"], "error: --sparsities"),
                          (["--methods", "force,nope"], "error: unknown method 'nope'")):
        with contextlib.chdir(tmp_path):
            r = CliRunner().invoke(main, ["sweep", tiny_at_init, *args, "--no-prefect"])
        assert r.exit_code == 2 and r.stderr.startswith(message), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()


def test_plain_sweep_publishes_the_sparsest_passing_cell_and_a_repeat_is_served_from_the_cache(tiny_at_init, tmp_path):
    args = [tiny_at_init, "--sparsities", "0.5,0.8,0.97", "--max-drop", "0.3", *FAST, "--min-accuracy", "0.2",
            "--no-prefect", "--json"]
    r = _sweep(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    cells = {c["label"]: c for c in s["cells"]}
    assert list(cells) == ["force@0.5", "force@0.8", "force@0.97"]
    baseline = s["baseline"]["top1"]
    assert 0.5 < baseline <= 1 and s["threshold"] == pytest.approx(max(0.2, baseline - 0.3))
    for c in cells.values():  # each cell's gate is the run's gate with the dense baseline and --max-drop
        assert c["drop"] == pytest.approx(baseline - c["top1"], abs=1e-6)
        assert c["passed"] == (c["top1"] >= s["threshold"]) or c["failures"]
        assert c["sparsity"] >= c["target_sparsity"] - 1 / 1928
    passing = [label for label, c in cells.items() if c["passed"]]
    assert passing and s["chosen_label"] == max(passing, key=lambda x: cells[x]["target_sparsity"])
    chosen = cells[s["chosen_label"]]
    manifest = json.loads((tmp_path / "registry/tiny/v1/manifest.json").read_text())
    assert manifest["config"]["sparsity"] == chosen["target_sparsity"]
    assert manifest["config"]["baseline_accuracy"] == pytest.approx(baseline)
    assert sorted(p.name for p in (tmp_path / "registry/tiny").glob("v*")) == ["v1"]  # only the chosen one
    sweep_dir = tmp_path / s["sweep_dir"]
    table = (sweep_dir / "sweep.md").read_text()
    assert f"| {s['chosen_label']} (published) |" in table and "![Pareto plot](pareto.png)" in table
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((sweep_dir / "sweep.json").read_text())["chosen_label"] == s["chosen_label"]
    assert "dense [3/6] sparse-train" in r.stderr and "force@0.8 [5/6] validate" in r.stderr

    again = _sweep(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = json.loads(again.stdout)
    assert s2["published"]["version"] == "v1" and not s2["published"]["created"]
    for c in s2["cells"]:  # every stage of every cell comes from its cache
        assert c["reused"] == ["import", "masks", "sparse-train", "export", "validate"], c
    assert again.stderr.count("reused (cached)") == 3 + 3 * 5  # the baseline's three stages, then the cells'
    assert [c["top1"] for c in s2["cells"]] == [c["top1"] for c in s["cells"]]


def test_no_passing_cell_exits_1_with_the_table_and_publishes_nothing(tiny_at_init, tmp_path):
    r = _sweep([tiny_at_init, "--sparsities", "0.9,0.95", "--min-accuracy", "0.99", "--baseline-accuracy", "0.9",
                "--epochs", "1", "--steps", "2", "--no-prefect"], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "No cell passed its gate: nothing published." in r.stdout
    assert r.stdout.count("FAIL: top-1 accuracy") == 2
    assert "dense [" not in r.stderr  # --baseline-accuracy given: no dense training
    assert not (tmp_path / "registry" / "tiny").exists()


def test_sweep_flow_runs_cells_two_at_a_time_and_leaves_the_table_and_plot_as_artifacts(prefect_harness,
                                                                                       tiny_at_init, tmp_path):
    from prefect.artifacts import Artifact

    from flows.sweep import force_compress_sweep

    schema = force_compress_sweep.parameters
    assert force_compress_sweep.name == "force-compress-sweep"
    assert {"sparsities", "methods", "jobs"} <= set(schema.properties)
    assert not {"sparsity", "method", "target_latency"} & set(schema.properties)  # each cell is one sparsity
    assert schema.properties["sparsities"]["default"] == [0.9, 0.95, 0.98, 0.99]

    result = force_compress_sweep(model=tiny_at_init, sparsities=[0.5, 0.7], methods=["force", "random"], jobs=2,
                                  epochs=1, steps=2, mask_batch_size=64, batch_size=64, min_accuracy=0.1,
                                  registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"))
    assert result["exit_code"] == 0 and len(result["cells"]) == 4
    assert result["chosen_label"].endswith("@0.7")
    table = Artifact.get("force-compress-sweep")
    assert "| force@0.5 |" in table.data and "Pareto plot: " in table.data
    plot = Artifact.get("force-compress-sweep-plot")
    assert plot.data.startswith("data:image/png;base64,")
    rows = Artifact.get("force-compress-sweep-cells")
    assert len(json.loads(rows.data)) == 4
