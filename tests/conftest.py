"""Shared test setup: Prefect gets its own home with analytics off (set before anything imports prefect),
one Prefect test harness per session, and a tiny trained digits classifier exported to ONNX."""

from __future__ import annotations

import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="fc-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for in-process flow tests (~10 s to start: once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _tiny_cnn():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(128, 10),
    )


def export_tiny(module, path, size: int = 8) -> str:
    """Export a (1, size, size) -> 10 classifier with a dynamic batch, the way users' files look."""
    import torch

    module.eval()
    torch.onnx.export(module, (torch.zeros(1, 1, size, size),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return str(path)


@pytest.fixture(scope="session")
def to_onnx():
    """`to_onnx(module, path, size=8)`: export a tiny classifier to ONNX."""
    return export_tiny


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """(dense ONNX path, trained torch module, DataSplits) for the digits data at 8x8: a 3-layer CNN trained
    for a few seconds to well above chance. The module is the trained dense network."""
    import torch
    import torch.nn.functional as F

    from pipeline.data import load_data

    torch.manual_seed(0)
    splits = load_data("digits", (1, 8, 8), num_classes=10, augment=False)
    module = _tiny_cnn()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    x, y = splits.train.batch(torch.arange(len(splits.train)))
    for _ in range(20):  # ~0.9 held-out accuracy
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    path = export_tiny(module, tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return path, module, splits


@pytest.fixture(scope="session")
def tiny_at_init(tmp_path_factory):
    """A tiny digits-shaped CNN (1x8x8 -> 10) at initialization, as ONNX: what a user hands to `compress`."""
    import torch

    torch.manual_seed(0)
    return export_tiny(_tiny_cnn(), tmp_path_factory.mktemp("init") / "tiny.onnx")
