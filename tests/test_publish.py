"""stages/publish: versions in a registry directory, identified by content, safe under concurrent publishers."""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import shutil

import numpy as np
import pytest
import torch

from pipeline.artifacts import sha256_file
from pipeline.config import make_config
from pipeline.errors import GateFailedError
from stages.publish import MODEL_FILE, publish, versions
from stages.validate import validate


@pytest.fixture(scope="module")
def passed_run(tiny_digits, to_onnx, tmp_path_factory):
    """A run directory as the pipeline leaves it: exported model, masks, report (passed)."""
    dense_path, module, splits = tiny_digits
    run_dir = tmp_path_factory.mktemp("run")
    pruned = copy.deepcopy(module)
    masks = {}
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if p.dim() > 1:
                keep = p.abs() >= p.abs().flatten().median()
                p.mul_(keep.float())
                masks[name] = keep.numpy()
    exported = to_onnx(pruned, run_dir / "model.sparse.onnx")
    np.savez(run_dir / "masks.npz", **masks)
    (run_dir / "masks.json").write_text(json.dumps({"method": "magnitude", "density": 0.5}))
    config = make_config(model=dense_path, sparsity=0.45, min_accuracy=0.3)
    report = validate(exported, config, run_dir, reference=pruned, val=splits.val, latency_runs=3)
    assert report.passed, report.failures
    return run_dir, report, config


def _config(config, registry):
    return config.model_copy(update={"registry": str(registry), "name": "tiny"})


def _other_content(run, tmp_path):
    """The same run with different exported bytes (another training result)."""
    run_dir, report, config = run
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    data = bytearray((other / "model.sparse.onnx").read_bytes())
    data[-1] ^= 1  # a different float in the last initializer
    (other / "model.sparse.onnx").write_bytes(bytes(data))
    return other, dataclasses.replace(report, exported_path=str(other / "model.sparse.onnx"))


def test_publish_writes_a_complete_version_with_manifest(passed_run, tmp_path):
    run_dir, report, config = passed_run
    config = _config(config, tmp_path / "registry")
    result = publish(run_dir, report, config)

    root = tmp_path / "registry" / "tiny"
    assert (result.version, result.created) == ("v1", True)
    assert sorted(p.name for p in (root / "v1").iterdir()) == sorted(
        [MODEL_FILE, "manifest.json", "report.json", "report.md", "report.png", "masks.npz", "masks.json"])
    assert [p.name for p in root.iterdir() if p.name.startswith(".staging")] == []
    assert (root / "LATEST").read_text().strip() == "v1"
    m = json.loads((root / "v1" / "manifest.json").read_text())
    assert m["source"]["sha256"] == sha256_file(config.model)
    assert m["output"]["sha256"] == sha256_file(root / "v1" / MODEL_FILE) == sha256_file(report.exported_path)
    assert m["config"]["sparsity"] == 0.45 and m["figures"]["top1"] == report.top1
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime", "onnx2torch"} and all(
        m["versions"][k] for k in ("torch", "onnx", "onnxruntime", "onnx2torch"))
    assert m["timestamp"].endswith("+00:00")
    assert all(sha256_file(root / "v1" / f) == h for f, h in m["files"].items())


def test_same_content_twice_is_one_version_and_new_content_the_next(passed_run, tmp_path):
    run_dir, report, config = passed_run
    config = _config(config, tmp_path / "registry")
    first, again = publish(run_dir, report, config), publish(run_dir, report, config)
    other_dir, other_report = _other_content(passed_run, tmp_path)
    second = publish(other_dir, other_report, config)

    assert (again.version, again.created, again.content_hash) == ("v1", False, first.content_hash)
    assert (second.version, second.created) == ("v2", True)
    assert versions(tmp_path / "registry", "tiny") == ["v1", "v2"]


def test_a_failed_gate_is_refused_and_nothing_is_written(passed_run, tmp_path):
    run_dir, report, config = passed_run
    failed = dataclasses.replace(report, checks=(dataclasses.replace(report.checks[0], passed=False,
                                                                     message="top-1 0.1 vs minimum 0.5"),))
    with pytest.raises(GateFailedError, match="top-1 0.1 vs minimum 0.5"):
        publish(run_dir, failed, _config(config, tmp_path / "registry"))
    assert not (tmp_path / "registry").exists()


def _publish_after(barrier, run_dir, report, config, queue):
    barrier.wait()
    r = publish(run_dir, report, config)
    queue.put((r.version, r.content_hash))


def test_processes_publishing_at_once_all_succeed_and_the_registry_stays_consistent(passed_run, tmp_path):
    run_dir, report, config = passed_run
    config = _config(config, tmp_path / "registry")
    other_dir, other_report = _other_content(passed_run, tmp_path)
    jobs = [(run_dir, report), (other_dir, other_report)] * 3
    ctx = multiprocessing.get_context("fork")  # real processes; publish itself runs no torch
    barrier, queue = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=_publish_after, args=(barrier, d, r, config, queue)) for d, r in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(jobs)
    results = [queue.get(timeout=5) for _ in jobs]

    by_content = {}
    for version, content in results:
        by_content.setdefault(content, set()).add(version)
    assert len(by_content) == 2 and all(len(v) == 1 for v in by_content.values())  # same content, same version
    root = tmp_path / "registry" / "tiny"
    assert versions(tmp_path / "registry", "tiny") == ["v1", "v2"]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock")) == ["LATEST", "v1", "v2"]
    for v in ("v1", "v2"):
        m = json.loads((root / v / "manifest.json").read_text())
        assert m["version"] == v and {m["content_hash"]} == {c for c, vs in by_content.items() if v in vs}
        assert all(sha256_file(root / v / f) == h for f, h in m["files"].items())
