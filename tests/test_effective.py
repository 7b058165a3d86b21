"""Effective sparsity (kept weights on an input→output path) and the fail-fast check that stops a run whose masks
cut the network before training: force_core on real small modules, the masks sidecar, `inspect`, and a real
`force-compress compress` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from force_core import effective_sparsity

ROOT = Path(__file__).resolve().parents[1]


def _chain():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}


def _resnet20(width: int = 4) -> nn.Module:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_accuracy import ResNet20Narrow

    torch.manual_seed(0)
    return ResNet20Narrow(width=width, in_ch=1)


def test_dense_chain_is_fully_effective():
    model = _chain()
    e = effective_sparsity(model, _full(model), (1, 8, 8))
    assert e.effective_kept == e.kept == e.sizes and e.effective_density == 1.0 and e.cut_layers == ()


def test_an_empty_layer_in_a_chain_cuts_every_layer():
    model = _chain()
    masks = _full(model)
    masks["2.weight"] = torch.zeros_like(masks["2.weight"])

    e = effective_sparsity(model, masks, torch.zeros(5, 1, 8, 8))  # an example input: its shape is what counts

    assert e.effective_kept_total == 0 and e.effective_density == 0.0
    assert e.cut_layers == ("0.weight", "2.weight", "6.weight")
    assert e.kept["0.weight"] == 72 and e.kept["2.weight"] == 0


def test_only_weights_between_live_units_count():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    first = torch.zeros(6, 6, dtype=torch.bool)
    first[:4] = True  # hidden units 0-3 are fed
    second = torch.zeros(3, 6, dtype=torch.bool)
    second[:, 2:] = True  # hidden units 2-5 are read

    e = effective_sparsity(model, {"0.weight": first, "2.weight": second}, (6,))

    assert e.kept == {"0.weight": 24, "2.weight": 12}
    assert e.effective_kept == {"0.weight": 12, "2.weight": 6}  # only through hidden units 2 and 3
    assert e.effective_density == pytest.approx(18 / 54) and e.cut_layers == ()


def test_an_empty_residual_branch_conv_keeps_the_skip_path_but_cuts_its_partner():
    model = _resnet20().eval()
    masks = _full(model)
    assert len(model.layers[0].short) == 0  # first block: identity shortcut
    masks["layers.0.c1.weight"] = torch.zeros_like(masks["layers.0.c1.weight"])

    e = effective_sparsity(model, masks, (1, 8, 8))

    assert e.cut_layers == ("layers.0.c1.weight", "layers.0.c2.weight")  # c2 sees only zeros now
    assert e.effective_kept["stem.0.weight"] == e.kept["stem.0.weight"] and e.effective_kept["fc.weight"] == 160
    assert 0 < e.effective_density < e.density


def test_weights_that_only_see_zero_padding_are_not_effective():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2, 2))
    e = effective_sparsity(model, _full(model), (1, 1, 1))  # at 1×1 only the centre tap meets the input
    assert e.effective_kept == {"0.weight": 2, "2.weight": 4}


def test_every_position_of_a_max_pool_window_is_on_a_path():
    # at 2×2 every 3×3 tap meets the input somewhere, but max pooling to 1×1 passes gradient to one position
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 2))
    e = effective_sparsity(model, _full(model), (1, 2, 2))
    assert e.effective_kept["0.weight"] == 9 and model[1]._forward_hooks == {}


def test_layernorm_and_a_softmax_output_do_not_hide_paths():
    # uniform values would make LayerNorm's input constant and move every logit alike: both give gradient 0
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3), nn.Softmax(dim=-1))
    e = effective_sparsity(model, _full(model), (4,))
    assert e.effective_density == 1.0


def test_a_zero_batchnorm_scale_is_still_a_path():
    model = _resnet20()
    for block in model.layers:
        nn.init.zeros_(block.b2.weight)  # zero_init_residual: the branch is silent at init, not pruned
    e = effective_sparsity(model, _full(model), (1, 8, 8))
    assert e.effective_density == 1.0


def test_a_graph_that_casts_to_float32_itself_is_measured(to_onnx, tmp_path):
    # timm's efficientvit attention holds ONNX Casts to float32: in float64 the next layer's bias and its input
    # would differ in dtype
    from stages.import_onnx import import_onnx
    from stages.onnx_convert.to_torch import load_module

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(256, 10)

        def forward(self, x):
            h = self.a(x).to(torch.float64).to(torch.float32)
            return self.fc(self.b(h).flatten(1))

    result = import_onnx(to_onnx(Casting(), tmp_path / "cast.onnx"), tmp_path / "out")
    module, param_map = load_module(result.normalized_path)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in module.named_parameters() if p.dim() > 1}
    assert effective_sparsity(module, masks, (1, 8, 8)).effective_density == 1.0


def test_the_model_is_left_exactly_as_found():
    model = _resnet20()
    model.train()
    model.layers[1].eval()
    model.fc.weight.requires_grad_(False)
    params = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (b, b.clone()) for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    masks = _full(model)
    masks["layers.0.c1.weight"] = torch.rand(masks["layers.0.c1.weight"].shape) < 0.5

    effective_sparsity(model, masks, (1, 8, 8))

    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        original, value, requires_grad = params[n]
        assert p is original and torch.equal(p, value) and p.requires_grad == requires_grad and p.grad is None
        assert p.dtype == torch.float32
    for n, b in model.named_buffers():
        assert b is buffers[n][0] and torch.equal(b, buffers[n][1])
    assert all(not m._forward_hooks for m in model.modules())


def test_masks_that_do_not_fit_the_model_are_refused():
    model = _chain()
    with pytest.raises(ValueError, match="not parameters"):
        effective_sparsity(model, {"9.weight": torch.ones(2, 2, dtype=torch.bool)}, (1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        effective_sparsity(model, {"0.weight": torch.ones(2, 2, dtype=torch.bool)}, (1, 8, 8))


# --- the masks stage, the check, inspect -----------------------------------------------------------------


def test_the_masks_sidecar_carries_effective_density(tiny_at_init, tmp_path):
    from stages.compute_masks import compute_masks_stage
    from stages.import_onnx import import_onnx

    imported = import_onnx(tiny_at_init, tmp_path)
    r = compute_masks_stage(imported.normalized_path, tmp_path / "masks.npz", method="random", density=0.3)

    side = json.loads((tmp_path / "masks.json").read_text())
    assert set(side["effective_kept"]) == set(side["kept"])  # keyed by initializer name, like kept
    assert all(side["effective_kept"][k] <= side["kept"][k] for k in side["kept"])
    assert side["effective_kept_total"] == sum(side["effective_kept"].values())
    assert side["effective_density"] == r.effective_density == side["effective_kept_total"] / side["total"]
    assert 0 < r.effective_density <= r.density and side["cut_layers"] == list(r.cut_layers) == []


def _mask_result(density: float, effective: float | None, cut=(), empty=()):
    from stages.compute_masks import MaskResult

    return MaskResult(Path("run/masks.npz"), Path("run/masks.json"), density=density, kept=1, total=100,
                      disconnected=tuple(empty), effective_density=effective, cut_layers=tuple(cut))


def test_the_check_stops_a_cut_network_with_one_line_naming_its_layers():
    from pipeline.config import make_config
    from pipeline.errors import NetworkCutError
    from stages.run.checks import check_cut

    config = make_config(model="m.onnx", sparsity=0.99)
    cut = ("conv1.weight", "conv2.weight", "conv3.weight", "fc.weight")
    with pytest.raises(NetworkCutError) as e:
        check_cut(_mask_result(0.01, 0.0, cut, empty=("conv2.weight",)), config)
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 1
    assert "4 layer(s)" in message and "empty: conv2.weight" in message
    assert "cut off: conv1.weight, conv3.weight, fc.weight" in message
    assert "effective density 0 vs target 0.01" in message and "--method iter_snip" in message

    with pytest.raises(NetworkCutError, match="almost no kept weight"):  # all but cut: 5% of the kept on a path
        check_cut(_mask_result(0.01, 0.0005), config)
    check_cut(_mask_result(0.01, 0.0025, cut[:1]), config)  # a quarter on a path: trains (random on mobilenet)
    check_cut(_mask_result(0.01, None), config)  # not measured: no opinion


def test_inspect_reports_the_effective_sparsity_of_the_files_zeros(to_onnx, tmp_path):
    from pipeline.cli import main

    model = _chain()
    with torch.no_grad():
        model[2].weight.zero_()  # the file's own zeros cut the network
    path = to_onnx(model, tmp_path / "cut.onnx")

    r = CliRunner().invoke(main, ["inspect", path, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["effective"]["effective_density"] == 0.0 and len(info["effective"]["cut_layers"]) == 3
    assert set(info["effective"]["effective_kept"]) == {layer["initializer"] for layer in info["layers"]}

    r = CliRunner().invoke(main, ["inspect", path])
    assert "effective density 0.0000 (0 non-zero weights on an input→output path); no path through 3 layer(s)" \
        in r.stdout


@pytest.mark.parametrize("path", [["--no-prefect"], []], ids=["plain", "prefect"])
def test_compress_stops_before_training_when_the_masks_cut_the_network(path, tiny_at_init, tmp_path):
    # 0.1% of 1,928 weights keeps 2: fewer than the 3 layers every input→output path crosses, a certain cut
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PREFECT_LOGGING_LEVEL": "INFO"}
    exe = Path(sys.executable).parent / "force-compress"
    r = subprocess.run([str(exe), "compress", tiny_at_init, "--method", "snip", "--sparsity", "0.999",
                        "--mask-batch-size", "64", "--epochs", "1", *path],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert "the masks cut the network: 3 layer(s)" in errors[0] and "--sparsity" in errors[0]
    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "masks.npz").exists() and not (run_dir / "trained.pt").exists()  # stopped before training
    assert json.loads((run_dir / "masks.json").read_text())["effective_kept_total"] == 0
    assert not list(tmp_path.glob("registry/*/v*"))  # nothing published
