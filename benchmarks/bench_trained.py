"""Mask methods on *trained* weights (issue 22): which keeps accuracy best, one-shot and after the finetune recipe.

A torchvision resnet18 (3x32x32, 10 classes) is trained here on digits as its user would (grey / 16, resized to
32x32 bilinear, no mean/std: `--mean 0,0,0 --std 1,1,1` states it), exported in eval mode (TorchScript, BatchNorm
folded into the convolutions) and then compressed by the CLI as a user runs it, per method and sparsity:

- one-shot: `--epochs 0` (the masks applied to the trained weights, nothing trained);
- finetune: no training option at all, so `--recipe auto` sees a trained input and fine-tunes it (the recipe of
  pipeline.config.RECIPES["finetune"]).

Each cell's exported file is scored by the pipeline's validation (onnxruntime, the held-out split).

    python benchmarks/bench_trained.py            # 4 methods x 4 sparsities x (one-shot, finetune)
    QUICK=1 python benchmarks/bench_trained.py    # magnitude and force at 0.9 and 0.99

Writes benchmarks/results/bench_trained[_quick].md|json; per-cell results under runs/bench_trained/ (kept, so an
interrupted grid resumes where it stopped).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench_trained"
QUICK = bool(os.environ.get("QUICK"))
METHODS = ("magnitude", "force") if QUICK else ("magnitude", "snip", "iter_snip", "force")
SPARSITIES = (0.9, 0.99) if QUICK else (0.9, 0.95, 0.98, 0.99)
PREP = ["--mean", "0,0,0", "--std", "1,1,1"]  # what the model was trained with


def trained_model() -> tuple[Path, float]:
    """resnet18 trained on digits (8 epochs, SGD, light augmentation), exported in eval mode; its held-out top-1
    under onnxruntime."""
    from torchvision.models import resnet18

    from pipeline.data import load_data, make_loader
    from stages.onnx_convert.scoring import onnx_accuracy

    path = WORK / "resnet18_digits_trained.onnx"
    splits = load_data("digits", (3, 32, 32), num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3)
    if not path.exists():
        torch.manual_seed(0)
        net = resnet18(num_classes=10)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        loader = make_loader(splits.train, 64, seed=0)
        epochs = 8
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=epochs * len(loader))
        for epoch in range(epochs):
            net.train()
            loader.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
                sched.step()
        net.eval()
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(tmp), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17)
        tmp.replace(path)
    return path, onnx_accuracy(path, splits.val)[0]


def cell(model: Path, method: str, sparsity: float, mode: str) -> dict:
    from click.testing import CliRunner

    from pipeline.cli import main

    out = WORK / "cells" / f"{method}_{sparsity:g}_{mode}.json"
    if out.exists():
        return json.loads(out.read_text())
    args = ["compress", str(model), *PREP, "--method", method, "--sparsity", str(sparsity), "--min-accuracy", "0",
            "--no-prefect", "--json", "--runs-dir", str(WORK / "runs"), "--registry", str(WORK / "registry"),
            "--name", f"{method}-{sparsity:g}-{mode}"]
    if mode == "one-shot":
        args += ["--epochs", "0"]
    t = time.perf_counter()
    r = CliRunner().invoke(main, args)
    if r.exit_code != 0:
        raise SystemExit(f"{method} {sparsity} {mode}: exit {r.exit_code}\n{r.output[-2000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    row = {"method": method, "sparsity": sparsity, "mode": mode, "top1": s["top1"], "input_top1": s["input_top1"],
           "recipe": s["recipe"], "seconds": round(time.perf_counter() - t, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row))
    print(f"{method:10s} {sparsity:<5g} {mode:9s} top-1 {row['top1']:.4f}  ({row['seconds']} s)", flush=True)
    return row


def main() -> None:
    model, top1 = trained_model()
    print(f"trained resnet18 on digits: held-out top-1 {top1:.4f} (onnxruntime)", flush=True)
    rows = [cell(model, m, s, mode) for mode in ("one-shot", "finetune") for s in SPARSITIES for m in METHODS]
    name = "bench_trained_quick" if QUICK else "bench_trained"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"input_top1": top1, "rows": rows}, indent=1))
    lines = [f"Trained torchvision resnet18 on digits (input top-1 {top1:.4f}); held-out top-1 of the exported model "
             "(onnxruntime), one-shot (`--epochs 0`) / after the finetune recipe.", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
             "|---|" + "---|" * len(SPARSITIES)]
    by = {(r["method"], r["sparsity"], r["mode"]): r["top1"] for r in rows}
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{by[m, s, 'one-shot']:.3f} / {by[m, s, 'finetune']:.3f}"
                                               for s in SPARSITIES) + " |")
    recipe = next(r["recipe"] for r in rows if r["mode"] == "finetune")
    lines += ["", f"Finetune cells: {recipe}"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
