"""The paper's headline at small scale: accuracy after sparse training vs sparsity, per pruning method.

A narrowed VGG19-style and a ResNet20-style network at (Kaiming) initialization are exported to ONNX and go
through the pipeline's own stages: import_onnx → compute_masks_stage → sparse_train → export_onnx, then the
exported file is scored with onnxruntime on the held-out digits split (the validation split training never saw).

    python benchmarks/bench_accuracy.py            # full grid: 2 nets × 5 methods × 6 sparsities × 3 seeds
    QUICK=1 python benchmarks/bench_accuracy.py    # one net (VGG), 99% and 99.5%, one seed

Writes benchmarks/results/bench_accuracy[_quick].md|png|json; per-run work under runs/bench_accuracy/ (kept, so
an interrupted grid resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench_accuracy"
METHODS = ("random", "snip", "grasp", "iter_snip", "force")
SPARSITIES = (0.90, 0.95, 0.98, 0.99, 0.995, 0.998)
SEEDS = (0, 1, 2)
# One fixed training budget for every cell (FORCE.md's recipe, scaled down): SGD lr 0.1, momentum 0.9,
# weight decay 5e-4, cosine; batch 128; masks from 20 exponential steps (force, iter_snip) of one batch each.
IMAGE = 16
EPOCHS = 30
BATCH = 128
MASK_STEPS = 20
MASK_BATCH = 128


# --------------------------------------------------------------------------------------------- networks


def _kaiming_(net: nn.Module) -> nn.Module:
    """The paper's initialization: Kaiming normal (fan-in, ReLU gain) for conv and linear weights."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class VGG19Narrow(nn.Module):
    """VGG19 (16 conv layers with BatchNorm, as in the GraSP/FORCE CIFAR code) narrowed to `width` channels in the
    first stage (64 at full size; 16 → 1.25M prunable weights) for 16×16 inputs: four max-pools take 16×16 to
    1×1, global average pooling, one linear classifier."""

    CFG = (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8)

    def __init__(self, width: int = 8, in_ch: int = 3, num_classes: int = 10):
        super().__init__()
        layers, c = [], in_ch
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v * width, 3, padding=1, bias=False), nn.BatchNorm2d(v * width), nn.ReLU()]
                c = v * width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


class ResNet20Narrow(nn.Module):
    """CIFAR ResNet20 (3 stages × 3 basic blocks, 1×1 projection shortcuts) with `width`, 2·width, 4·width
    channels (16 is the original: 270k prunable weights)."""

    def __init__(self, width: int = 8, in_ch: int = 3, num_classes: int = 10, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(_Block(c, w, 2 if (b == 0 and i > 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


NETS = {"vgg19": VGG19Narrow, "resnet20": ResNet20Narrow}
WIDTH = int(os.environ.get("BENCH_WIDTH", "16"))  # channels of the first stage (VGG19: 64, ResNet20: 16 at full size)


def build(net: str, seed: int, width: int = WIDTH) -> nn.Module:
    torch.manual_seed(seed)
    return _kaiming_(NETS[net](width=width))


def export(net: str, seed: int, path: Path, fused: bool = False) -> Path:
    """The network at initialization as an ONNX classifier (N, 3, IMAGE, IMAGE) -> (N, 10). `fused`: as most
    users' exports are, BatchNorm folded into the convolutions by constant folding, batch fixed at 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(net, seed).eval()
    # Exported as users' exporters write it (eval mode, equal constants merged); import un-shares them.
    torch.onnx.export(model, torch.zeros(1, 3, IMAGE, IMAGE), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes=None if fused else {"input": {0: "n"}, "logits": {0: "n"}},
                      opset_version=17, dynamo=False,
                      do_constant_folding=fused)  # False keeps BatchNormalization nodes (folding merges them)
    return path


# --------------------------------------------------------------------------------------------- one cell


@lru_cache(maxsize=1)
def _splits():
    from pipeline.data import load_data

    return load_data("digits", (3, IMAGE, IMAGE), num_classes=10, seed=0)


def run_cell(job: dict) -> dict:
    """import (done once per net/seed) → masks → sparse-train → export → onnxruntime accuracy."""
    from pipeline.config import make_config
    from pipeline.data import mask_batches
    from stages.compute_masks import compute_masks_stage
    from stages.export_onnx import export_onnx
    from stages.onnx_convert.scoring import onnx_accuracy
    from stages.sparse_train.training import sparse_train

    torch.set_num_threads(job["threads"])
    train_norm, on_collapse = job.get("train_norm", True), job.get("on_collapse", "nested")
    out = Path(job["dir"])
    done = out / "cell.json"
    if done.exists():
        return json.loads(done.read_text()) | {"reused": True}
    t0 = time.perf_counter()
    splits = _splits()
    method, sparsity, seed = job["method"], job["sparsity"], job["seed"]
    density = 1.0 - sparsity
    mask_method = "random" if method == "dense" else method  # dense reference: every weight kept
    per_step = job.get("batches_per_step", 1)
    n_batches = MASK_STEPS * per_step if method in ("force", "iter_snip") else per_step
    batches = None if mask_method == "random" else mask_batches(splits, MASK_BATCH, n_batches, seed=seed)
    masks = compute_masks_stage(job["normalized"], out / "masks.npz", method=mask_method, density=density,
                                steps=MASK_STEPS, schedule="exp", batches=batches, batches_per_step=per_step,
                                seed=seed, train_norm=train_norm, on_collapse=on_collapse,
                                collapse_ratio=job.get("collapse_ratio"))
    t_masks = time.perf_counter() - t0
    config = make_config(model=job["onnx"], sparsity=sparsity if sparsity > 0 else None, method=mask_method,
                         epochs=job.get("epochs", EPOCHS), batch_size=BATCH, seed=seed, device="cpu", data="digits",
                         steps=MASK_STEPS, train_norm=train_norm, on_collapse=on_collapse)
    trained = sparse_train(job["normalized"], masks.masks_path, config, out, progress=False)
    exported = export_onnx(job["normalized"], trained.state_path, out / "model.sparse.onnx",
                           masks_path=masks.masks_path, provenance={"bench": "accuracy"})
    top1, _ = onnx_accuracy(exported.out_path, splits.val, threads=1)  # the validation stage's scoring
    side = json.loads(masks.meta_path.read_text())
    cell = {
        "net": job["net"], "method": method, "sparsity": sparsity, "seed": seed, "ort_val_acc": top1,
        "torch_val_acc": trained.val_acc, "train_acc": trained.train_acc, "density": masks.density,
        "file_density": exported.density, "disconnected": len(masks.disconnected),
        "n_layers": len(side["sizes"]), "mask_seconds": t_masks, "seconds": time.perf_counter() - t0,
        "kept": side["kept"], "sizes": side["sizes"], "effective_density": side.get("effective_density"),
        "cut_layers": side.get("cut_layers"), "step_losses": side.get("step_losses"),
        "collapse_step": side.get("collapse_step"), "train_norm_layers": len(trained.train_norm_layers),
    }
    done.write_text(json.dumps(cell, indent=1))
    return cell


# --------------------------------------------------------------------------------------------- report


def _fmt_pct(s: float) -> str:
    return f"{100 * s:g}%"


def render(cells: list[dict], nets, sparsities, seeds, elapsed: float, title: str) -> str:
    lines = [
        f"# Accuracy vs sparsity at initialization ({title})",
        "",
        f"Digits (scikit-learn, 1797 images, resized to {IMAGE}×{IMAGE} RGB, 10% held out, stratified, seed 0); "
        f"networks (first-stage width {WIDTH}) at Kaiming init exported to ONNX and run through "
        f"import → masks → sparse-train → export; "
        f"accuracy = **onnxruntime top-1 of the exported file on the held-out split**. One budget for every cell: "
        f"{EPOCHS} epochs SGD (lr 0.1, momentum 0.9, wd 5e-4, cosine), batch {BATCH}, crop augmentation; masks from "
        f"{MASK_STEPS} exponential steps × 1 batch of {MASK_BATCH} (force, iter_snip), one batch (snip, grasp). "
        f"Seeds {', '.join(map(str, seeds))} (init, masks, training). Cells: median [min–max] over seeds; "
        f"`d` = layers left with no weight (median) of the prunable layers. Wall time {elapsed / 60:.1f} min"
        f"{_reused_note(cells)}, "
        f"torch {torch.__version__}, CPU.",
        "",
    ]
    for net in nets:
        sub = [c for c in cells if c["net"] == net]
        if not sub:
            continue
        n_layers = sub[0]["n_layers"]
        dense = [c["ort_val_acc"] for c in sub if c["method"] == "dense"]
        head = f"## {net} ({n_layers} prunable layers"
        head += f"; dense: {statistics.median(dense):.3f})" if dense else ")"
        lines += [head, "", "| method | " + " | ".join(_fmt_pct(s) for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities)]
        for method in METHODS:
            row = []
            for s in sparsities:
                cs = [c for c in sub if c["method"] == method and abs(c["sparsity"] - s) < 1e-9]
                if not cs:
                    row.append("–")
                    continue
                accs = [c["ort_val_acc"] for c in cs]
                dis = statistics.median(c["disconnected"] for c in cs)
                rng = f" [{min(accs):.3f}–{max(accs):.3f}]" if len(accs) > 1 else ""
                row.append(f"{statistics.median(accs):.3f}{rng} d={dis:g}")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Chance is 0.100. Per-cell records (torch val accuracy, train accuracy, seconds) are in the JSON beside "
              "this file.", ""]
    return "\n".join(lines)


def _reused_note(cells: list[dict]) -> str:
    """A wall time only means something next to how many cells were computed in it."""
    n = sum(1 for c in cells if c.get("reused"))
    return f" ({n} of {len(cells)} cells reused from an earlier run in runs/bench_accuracy/)" if n else ""


def plot(cells: list[dict], nets, sparsities, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets, strict=True):
        for method in METHODS:
            xs, med, lo, hi = [], [], [], []
            for s in sparsities:
                accs = [c["ort_val_acc"] for c in cells if c["net"] == net and c["method"] == method
                        and abs(c["sparsity"] - s) < 1e-9]
                if accs:
                    xs.append(100 * s)
                    med.append(statistics.median(accs))
                    lo.append(min(accs))
                    hi.append(max(accs))
            if xs:
                ax.plot(range(len(xs)), med, marker="o", label=method)
                ax.fill_between(range(len(xs)), lo, hi, alpha=0.15)
                ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        dense = [c["ort_val_acc"] for c in cells if c["net"] == net and c["method"] == "dense"]
        if dense:
            ax.axhline(statistics.median(dense), color="k", ls="--", lw=1, label="dense")
        ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
        ax.set_title(f"{net} on digits ({IMAGE}×{IMAGE})")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("val top-1 (onnxruntime)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def quick_from_env() -> bool:
    return os.environ.get("QUICK", "").strip() not in ("", "0", "false", "no")


def run_grid(jobs: list[dict], workers: int, cell_fn, progress_fn, t0: float) -> list[dict]:
    """`cell_fn(job)` for every job, in `workers` spawned processes (1: in this one), reporting each as it ends."""
    cells = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, cell in enumerate(pool.imap_unordered(cell_fn, jobs), 1):
                cells.append(cell)
                progress_fn(i, len(jobs), cell, t0)
    else:
        for i, job in enumerate(jobs, 1):
            cells.append(cell_fn(job))
            progress_fn(i, len(jobs), cells[-1], t0)
    return cells


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=quick_from_env(), help="one net, 99 and 99.5%%, one seed")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument("--nets", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    args = ap.parse_args(argv)

    nets = args.nets or (["vgg19"] if args.quick else list(NETS))
    sparsities = (0.99, 0.995) if args.quick else SPARSITIES
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else SEEDS)
    methods = args.methods or list(METHODS)
    partial = not args.quick and (args.nets or args.seeds or args.methods)
    tag = "_quick" if args.quick else ("_partial" if partial else "")
    t0 = time.perf_counter()

    from stages.import_onnx import import_onnx

    jobs = []
    for net in nets:
        for seed in seeds:
            base = WORK / f"{net}-w{WIDTH}-s{seed}"
            onnx_path = base / "init.onnx"
            if not (base / "normalized.onnx").exists():
                export(net, seed, onnx_path)
                import_onnx(onnx_path, base)
            common = {"net": net, "seed": seed, "onnx": str(onnx_path), "normalized": str(base / "normalized.onnx"),
                      "threads": 1 if args.jobs > 1 else max(1, torch.get_num_threads())}
            if not args.no_dense and seed == seeds[0]:
                jobs.append({**common, "method": "dense", "sparsity": 0.0, "dir": str(base / "dense")})
            for method in methods:
                for s in sparsities:
                    jobs.append({**common, "method": method, "sparsity": s, "dir": str(base / f"{method}-{s:g}")})

    cells = run_grid(jobs, args.jobs, _run_safe, _progress, t0)
    cells = [c for c in cells if "error" not in c] + [c for c in cells if "error" in c]
    elapsed = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    ok = [c for c in cells if "error" not in c]
    (RESULTS / f"bench_accuracy{tag}.json").write_text(json.dumps(cells, indent=1))
    title = "QUICK" if args.quick else ("partial grid" if partial else "full grid")
    (RESULTS / f"bench_accuracy{tag}.md").write_text(render(ok, nets, sparsities, seeds, elapsed, title))
    plot(ok, nets, sparsities, RESULTS / f"bench_accuracy{tag}.png")
    print((RESULTS / f"bench_accuracy{tag}.md").read_text())
    errors = [c for c in cells if "error" in c]
    for e in errors:
        print("FAILED", e, file=sys.stderr)
    return 1 if errors else 0


def _run_safe(job: dict) -> dict:
    try:
        return run_cell(job)
    except Exception as e:  # noqa: BLE001 - one failed cell must not lose the grid; reported at the end
        return {k: job[k] for k in ("net", "method", "sparsity", "seed")} | {"error": f"{type(e).__name__}: {e}"}


def _progress(i: int, n: int, cell: dict, t0: float) -> None:
    acc = cell.get("ort_val_acc", float("nan"))
    print(f"[{i}/{n} {time.perf_counter() - t0:6.0f}s] {cell['net']} {cell['method']:9s} "
          f"{_fmt_pct(cell['sparsity']):>6s} seed {cell['seed']}: acc {acc:.3f} "
          f"{cell.get('error', '')} ({cell.get('seconds', 0):.0f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
