"""flows/: the Prefect flow `force-compress` (parameters, caching, retries, artifacts) under Prefect's test harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prefect import flow
from prefect.artifacts import Artifact

from flows.compress import force_compress, run_stage_as_task
from pipeline.config import CompressConfig
from pipeline.errors import GateFailedError
from pipeline.stage import Stage
from stages.run.calls import StageCall


def test_flow_parameters_are_the_config_fields_with_their_defaults_and_constraints():
    schema = force_compress.parameters
    assert force_compress.name == "force-compress"
    assert list(schema.properties) == list(CompressConfig.model_fields)
    assert schema.required == ["model"]
    for name, field in CompressConfig.model_fields.items():
        if not field.is_required():
            assert schema.properties[name]["default"] == (list(field.default) if isinstance(field.default, tuple)
                                                          else field.default)
    sparsity = schema.properties["sparsity"]
    assert (sparsity["exclusiveMinimum"], sparsity["exclusiveMaximum"]) == (0.0, 1.0)
    assert schema.properties["device"]["enum"] == ["auto", "cpu", "cuda"]


def test_a_bad_parameter_is_refused_before_the_flow_runs():
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="sparsity"):
        force_compress.validate_parameters({"model": "m.onnx", "sparsity": 1.5})


def test_publish_retries_transient_io_errors_but_not_a_refused_gate(prefect_harness):
    calls = {"io": 0, "gate": 0}

    def flaky_io():
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError("disk hiccup")
        return "published"

    def refused():
        calls["gate"] += 1
        raise GateFailedError("gate failed")

    @flow
    def publish_twice():
        ok = run_stage_as_task(StageCall(Stage("publish", flaky_io, reads=None), {}))
        with pytest.raises(GateFailedError):
            run_stage_as_task(StageCall(Stage("publish", refused, reads=None), {}))
        return ok

    assert publish_twice() == "published"
    assert calls == {"io": 3, "gate": 1}


def _inodes(run_dir: Path) -> dict[str, int]:
    names = ("normalized.onnx", "masks.npz", "trained.pt", "model.sparse.onnx", "report.json")
    return {n: os.stat(run_dir / n).st_ino for n in names}


def test_flow_publishes_and_a_repeated_request_is_served_from_the_cache(prefect_harness, tiny_at_init, tmp_path,
                                                                        info_logs):
    params = dict(model=tiny_at_init, sparsity=0.9, epochs=1, steps=2, mask_batch_size=64, batch_size=64,
                  min_accuracy=0.15, registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"))
    first = force_compress(**params)
    assert first["published"] and first["version"] == "v1"
    report = Artifact.get("force-compress-report")
    assert report is not None and "Gate: PASSED" in report.data and "dense speed" in report.data
    layers = Artifact.get("force-compress-layers")
    assert layers is not None and "density" in layers.data
    lines = _logged_lines()  # the training's epoch line (stderr on a terminal) is in the run's log too
    assert any(line.startswith("epoch 1/1: loss") and "img/s" in line for line in lines), lines[-20:]
    run_dir = Path(first["run_dir"])
    before = _inodes(run_dir)

    again = force_compress(**params)  # every stage comes from the cache: no file is rewritten
    assert again["version"] == "v1" and again["run_dir"] == first["run_dir"]
    assert _inodes(run_dir) == before

    (run_dir / "masks.npz").unlink()  # a cached stage whose output is gone runs again
    third = force_compress(**params)
    assert (run_dir / "masks.npz").exists() and third["published"]


@pytest.fixture
def info_logs():
    """The suite runs Prefect at WARNING (conftest); the run loggers at INFO here, to read what a run logs."""
    import logging

    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    handlers = {h for lg in loggers for h in lg.handlers}
    before = [(x, x.level) for x in [*loggers, *handlers]]
    for x, _ in before:
        x.setLevel(logging.INFO)
    yield
    for x, level in before:
        x.setLevel(level)


def _logged_lines() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what the run logged before reading it back
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs()]


def test_a_failed_gate_fails_the_flow_run_and_publishes_nothing(prefect_harness, tiny_at_init, tmp_path):
    params = dict(model=tiny_at_init, sparsity=0.9, epochs=0, steps=2, mask_batch_size=64, batch_size=64,
                  min_accuracy=1.0, registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"))
    with pytest.raises(GateFailedError, match="short by"):
        force_compress(**params)
    assert not (tmp_path / "registry").exists()


def test_bad_input_fails_the_flow_before_any_file_is_written(prefect_harness, tmp_path):
    from pipeline.errors import BadInputError

    with pytest.raises(BadInputError, match="unknown method"):
        force_compress(model=str(tmp_path / "m.onnx"), method="nope", runs_dir=str(tmp_path / "runs"))
    assert list(tmp_path.iterdir()) == []
