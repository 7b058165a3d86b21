"""`--nproc N`: the sparse-train stage data-parallel under torchrun (gloo on these CPUs) from the user's commands:
the same weights as one process, errors and crashes of a worker, the Prefect flow, and a two-node rendezvous
played on one machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.config import CompressConfig, make_config
from pipeline.errors import BadInputError, DataError

# No BatchNorm (none in the model, --no-train-norm) and no augmentation: then N processes compute one process's
# maths, and the weights must agree within the tolerance of tests/test_train.py's DDP test.
RECIPE = ["--sparsity", "0.5", "--epochs", "2", "--steps", "2", "--mask-batch-size", "64", "--batch-size", "64",
          "--no-augment", "--no-train-norm", "--min-accuracy", "0", "--no-prefect", "--json"]
BIN = Path(sys.executable).parent


def _cli(args, cwd, env=None, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([str(BIN / "force-compress"), "compress", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_training(one: dict, other: dict, work: Path) -> None:
    a, b = _state(work / one["run_dir"] / "trained.pt"), _state(work / other["run_dir"] / "trained.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    masks = [np.load(work / s["registry_path"] / "masks.npz") for s in (one, other)]  # the published masks
    assert sorted(masks[0].files) == sorted(masks[1].files)
    for k in masks[0].files:
        assert np.array_equal(masks[0][k], masks[1][k]), k


@pytest.fixture(scope="module")
def reference(tiny_at_init, tmp_path_factory):
    """(work dir, --json summary) of the one-process run of RECIPE."""
    work = tmp_path_factory.mktemp("nproc")
    r = _cli([tiny_at_init, *RECIPE, "--nproc", "1"], work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, json.loads(r.stdout)


def test_nproc_is_a_config_field_so_cli_make_and_flow_have_it():
    field = CompressConfig.model_fields["nproc"]
    assert field.default == 1 and "gloo" in field.description and "GPU" in field.description
    with pytest.raises(BadInputError, match="nproc"):
        make_config(model="m.onnx", nproc=0)
    from flows.compress import force_compress

    assert force_compress.parameters.properties["nproc"]["default"] == 1
    assert "--nproc $(NPROC)" in (Path(__file__).resolve().parents[1] / "Makefile").read_text()


def test_nproc_keys_the_training_stage_only():
    from stages.run.checks import run_fingerprint
    from stages.run.order import STAGES

    assert [s.name for s in STAGES if s.reads is not None and "nproc" in s.reads] == ["sparse-train"]
    base = make_config(model="m.onnx")
    assert run_fingerprint(base.model_copy(update={"nproc": 2})) != run_fingerprint(base)


def test_more_processes_than_gpus_is_bad_input_and_than_cores_a_warning(monkeypatch):
    import warnings

    from stages.sparse_train import worker
    from stages.sparse_train.worker import check_nproc

    monkeypatch.setattr(worker, "resolve_device", lambda device: torch.device(device))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BadInputError, match=r"--nproc 2 .* 1 GPU\(s\); use --nproc 1 or fewer, or --device cpu"):
        check_nproc(2, "cuda")
    with pytest.warns(UserWarning, match="CPU core"):
        check_nproc((os.cpu_count() or 1) + 1, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_nproc(1, "cpu")


def test_nproc_0_exits_2_with_one_line(tiny_at_init, tmp_path):
    r = _cli([tiny_at_init, "--nproc", "0", "--no-prefect"], tmp_path, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "nproc" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_each_rank_gets_its_share_of_every_same_global_batch():
    """make_loader's rank/world_size split (the in-memory loader): the union of the ranks' i-th batches is the
    one-process i-th batch, every epoch; with a global batch of 64, 32 images each."""
    from pipeline.data import TensorImageDataset, make_loader

    n = 1618  # the digits training split
    data = TensorImageDataset(torch.zeros(n, 1, 2, 2), torch.arange(n), [0.0], [1.0])
    for epoch in (0, 1):
        one = make_loader(data, 64, seed=0)
        ranks = [make_loader(data, 32, seed=0, rank=r, world_size=2) for r in (0, 1)]
        for loader in (one, *ranks):
            loader.set_epoch(epoch)
        batches = [[y.tolist() for _, y in loader] for loader in (one, *ranks)]
        assert len(batches[0]) == len(batches[1]) == len(batches[2])
        for whole, r0, r1 in zip(*batches, strict=True):
            assert sorted(r0 + r1) == sorted(whole) and len(r0) == len(r1)


def test_sync_batchnorm_keeps_parameters_buffers_and_outputs():
    """What CUDA runs under DDP (SyncBatchNorm), checked where it can be here: outside a process group the
    converted module computes exactly what the BatchNorm one does, with the same tensors and state_dict keys."""
    from force_core.train_norm import FeatureBatchNorm
    from stages.sparse_train.training import sync_batchnorm_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 6),
                          FeatureBatchNorm(6), nn.Unflatten(1, (2, 3)), FeatureBatchNorm(3))
    twin = nn.Sequential(*[m for m in model])  # the same modules: run once before conversion
    x = torch.randn(8, 1, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = twin(x)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    weight = model[1].weight
    paths = sync_batchnorm_(model)
    assert paths == ["1", "4", "6"] and all(isinstance(model[int(p)], nn.SyncBatchNorm) for p in paths)
    assert model[1].weight is weight and list(model.state_dict()) == list(before)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)


def test_worker_bad_input_comes_back_as_the_same_error(reference, tmp_path):
    from stages.sparse_train.worker import sparse_train_processes

    work, summary = reference
    run_dir = work / summary["run_dir"]
    config = make_config(model="tiny.onnx", data=f"npz:{tmp_path / 'missing.npz'}", nproc=2, epochs=1,
                         train_norm=False, device="cpu")
    with pytest.raises(DataError, match="missing.npz"):
        sparse_train_processes(run_dir / "normalized.onnx", run_dir / "masks.npz", config, tmp_path / "run")
    assert not (tmp_path / "run" / "trained.pt").exists()


def test_cli_nproc_2_survives_a_worker_crash_then_equals_nproc_1(reference, tiny_at_init, tmp_path):
    work, one = reference
    hook = tmp_path / "hook"
    hook.mkdir()  # a training process killed (out of memory, say): rank 1 dies at start-up
    (hook / "sitecustomize.py").write_text(
        "import os, signal\nif os.environ.get('RANK') == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    crashed = _cli([tiny_at_init, *RECIPE, "--nproc", "2"], work, env={"PYTHONPATH": str(hook)})
    assert crashed.returncode == 4, crashed.stderr[-3000:]
    assert "sparse-train on 2 processes failed" in crashed.stderr and "SIGKILL" in crashed.stderr, crashed.stderr

    r = _cli([tiny_at_init, *RECIPE, "--nproc", "2"], work)  # the same request again: import and masks reused
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)  # stdout holds the summary only: the workers' lines went to stderr
    assert "[2/6] masks: reused (cached)" in r.stderr, r.stderr
    assert "epoch 2/2:" in r.stderr, r.stderr  # rank 0's progress reaches the user
    assert "2 epoch(s) on 2 processes" in r.stderr, r.stderr
    assert json.loads((work / two["run_dir"] / "train_result.json").read_text())["world_size"] == 2
    assert two["run_dir"] != one["run_dir"]  # nproc is part of the run's key
    _assert_same_training(one, two, work)


@pytest.mark.slow  # ~30 s: the default suite keeps this file under 90 s on 2 cores; `pytest -m slow` runs it
def test_two_nodes_by_rendezvous_one_launched_by_compress_one_joining(reference, tiny_at_init, tmp_path):
    """README's multi-node recipe on one machine: `compress` with torchrun's PET_* rendezvous variables is one
    node, a bare `torchrun ... -m stages.sparse_train.worker` (no run directory, another working directory) the
    other."""
    work, one = reference
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_ID": uuid.uuid4().hex}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
                              "c10d", "--rdzv-endpoint", rdzv["PET_RDZV_ENDPOINT"], "--rdzv-id", rdzv["PET_RDZV_ID"],
                              "-m", "stages.sparse_train.worker"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        r = _cli([tiny_at_init, *RECIPE, "--nproc", "1", "--runs-dir", "runs-2nodes"], work,
                 env={**rdzv, "PET_NNODES": "2"})
        out, _ = other.communicate(timeout=60)
    finally:
        other.kill()
    assert r.returncode == 0, r.stderr[-3000:] + out[-2000:]
    assert other.returncode == 0, out[-3000:]
    two = json.loads(r.stdout)
    assert json.loads((work / two["run_dir"] / "train_result.json").read_text())["world_size"] == 2
    _assert_same_training(one, two, work)


def test_flow_run_with_nproc_2(prefect_harness, tiny_at_init, tmp_path):
    from flows.compress import force_compress

    summary = force_compress(model=tiny_at_init, sparsity=0.5, epochs=1, steps=2, mask_batch_size=64, batch_size=64,
                             augment=False, train_norm=False, min_accuracy=0.0, nproc=2,
                             registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"))
    assert summary["published"]
    trained = json.loads((Path(summary["run_dir"]) / "train_result.json").read_text())
    assert trained["world_size"] == 2 and trained["epochs"] == 1


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(f"{cmdline.parent.name}: {args[:160]}")
    return found


@pytest.mark.slow  # ~20 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_compress_leaves_no_training_process(tiny_at_init, tmp_path):
    import signal
    import time

    runs = f"runs-{uuid.uuid4().hex[:8]}"  # in every training process's command line (the run directory)
    parent = subprocess.Popen([str(BIN / "force-compress"), "compress", tiny_at_init, *RECIPE, "--nproc", "2",
                               "--epochs", "500", "--runs-dir", runs], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in parent.stderr:  # wait until the workers train
            if line.startswith("epoch 1/500"):
                break
        assert len(_processes_mentioning(runs)) >= 3  # torchrun and its two workers
        parent.send_signal(signal.SIGKILL)  # no handler runs: only the parent-death signals clean up
        parent.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _processes_mentioning(runs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_mentioning(runs) == []
    finally:
        parent.kill()
