"""The shape of the code: no module imports, directly or through a chain, a module that imports it back (imports
inside functions count); every stage is declared once with the fields it reads; one run opens its data once, on the
plain path and through the Prefect flow."""

from __future__ import annotations

import grimp
import pytest
from click.testing import CliRunner

import pipeline.data
import stages.onnx_convert.channels.analysis as channel_analysis
from pipeline.cli import main
from pipeline.config import CompressConfig
from stages.run.order import STAGES

PACKAGES = ("pipeline", "stages", "force_core", "flows")


def test_no_module_imports_a_module_that_imports_it_back():
    graph = grimp.build_graph(*PACKAGES)
    cycles = sorted((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                    if graph.chain_exists(importer=b, imported=a))
    assert cycles == [], "import cycles (importer, imported) whose imported module leads back: " + ", ".join(
        f"{a} -> {b} -> ... -> {a}" for a, b in cycles[:10])


def test_every_stage_is_declared_once_with_fields_of_the_config():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names)) == 8
    for stage in STAGES:
        assert stage.reads is None or stage.reads <= set(CompressConfig.model_fields), stage.name
    assert [s.name for s in STAGES if not s.cached] == ["publish"]


@pytest.fixture
def count_loads(monkeypatch):
    """How many times the digits source is read (decoded into images) from here on."""
    loads = []
    digits = pipeline.data._SOURCES["digits"]

    def counted(arg, shape, geometry):
        loads.append(shape)
        return digits(arg, shape, geometry)

    monkeypatch.setitem(pipeline.data._SOURCES, "digits", counted)
    return loads


FAST = ["--epochs", "1", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64", "--min-accuracy", "0"]


CHANNEL_INT8 = ["--structure", "channel", "--channel-multiple", "1", "--sparsity", "0.5", "--quantize", "int8"]


@pytest.mark.parametrize("extra", [["--no-prefect"], [], ["--no-prefect", *CHANNEL_INT8]],
                         ids=["plain", "prefect", "plain-channel-int8"])
def test_one_run_loads_its_data_once(extra, tiny_at_init, tmp_path, count_loads, prefect_harness, monkeypatch):
    analyses = []
    builder = channel_analysis.ChannelBuilder

    def counted_builder(model):
        analyses.append(model.graph.name)
        return builder(model)

    monkeypatch.setattr(channel_analysis, "ChannelBuilder", counted_builder)
    args = ["compress", tiny_at_init, *FAST, "--runs-dir", str(tmp_path / "runs"), "--registry",
            str(tmp_path / "registry"), "--json", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(count_loads) == 1, f"the data was read {len(count_loads)} times in one run"
    assert len(analyses) == (1 if "channel" in extra else 0), "a channel run analyses its graph once"
