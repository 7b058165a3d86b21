"""Sparse-training cost: masked step time ÷ dense step time on the same model and batch (target ≤ 1.05), and
training throughput (images/s) of the real loop, on CPU and on CUDA where present.

    python benchmarks/bench_train.py [--device cpu|cuda|all] [--rounds 15]

The masked and dense steps run interleaved, block by block, in one process (same model, same batch, same
optimizer: SGD momentum 0.9, weight decay 5e-4), so machine load affects both alike; the ratio is of the
medians. Results accumulate in benchmarks/results/bench_train.json (one entry per device and host) and are
rendered to benchmarks/results/bench_train.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_accuracy import ResNet20Narrow, VGG19Narrow, _kaiming_  # noqa: E402

from pipeline.config import make_config  # noqa: E402
from pipeline.data import load_data  # noqa: E402
from stages.sparse_train.training import _apply_, _mask_grads_, hold_masks, train_module, train_step  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ratio(net_name: str, net: torch.nn.Module, device: torch.device, batch: int, image: int,
               rounds: int, steps: int, sparsity: float = 0.9) -> dict:
    """Median seconds per step, dense vs masked (global random masks at `sparsity` on conv/linear weights)."""
    torch.manual_seed(0)
    dense = _kaiming_(net).to(device)
    masked = copy.deepcopy(dense)
    if device.type == "cuda":
        dense.to(memory_format=torch.channels_last)
        masked.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(p.shape, generator=g) >= sparsity) for n, p in masked.named_parameters() if p.dim() > 1}
    enforcer = hold_masks(masked, masks)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt_m = torch.optim.SGD(masked.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, image, image, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def block(model, opt, enf) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            train_step(model, x, y, opt, enf)
        _sync(device)
        return (time.perf_counter() - t) / steps

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        block(dense, opt_d, None)
        block(masked, opt_m, enforcer)
    td, tm = [], []
    for r in range(rounds):  # interleaved, alternating which goes first
        if r % 2:
            tm.append(block(masked, opt_m, enforcer))
            td.append(block(dense, opt_d, None))
        else:
            td.append(block(dense, opt_d, None))
            tm.append(block(masked, opt_m, enforcer))
    exact = all(torch.count_nonzero(p.detach()[~m.to(p.device)]) == 0 for p, m in
                zip((dict(masked.named_parameters())[n] for n in masks), masks.values(), strict=True))
    # Paired rounds: the ratio of each masked block to its neighbouring dense block cancels slow swings of load
    # on a shared machine; the median of those is the figure, the ratio of the fastest blocks a cross-check.
    d, m = statistics.median(td), statistics.median(tm)
    hold = []  # the mask hold alone (what a masked step adds): gradient mask + weight re-mask
    for p in masked.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        for _ in range(20):
            _mask_grads_(enforcer)
            _apply_(enforcer)
        _sync(device)
        hold.append((time.perf_counter() - t) / 20)
    paired = statistics.median(b / a for a, b in zip(td, tm, strict=True))
    n_prunable = sum(mk.numel() for mk in masks.values())
    return {"model": net_name, "prunable_weights": n_prunable, "batch": batch, "image": image,
            "sparsity": sparsity, "dense_ms": 1e3 * d, "masked_ms": 1e3 * m, "ratio": paired,
            "ratio_of_medians": m / d, "ratio_of_minima": min(tm) / min(td), "threads": torch.get_num_threads(),
            "dense_img_s": batch / d, "masked_img_s": batch / m, "masks_exact": bool(exact),
            "rounds": rounds, "steps_per_round": steps, "hold_ms": 1e3 * min(hold),
            "hold_fraction": min(hold) / d}


def loop_throughput(device: torch.device, epochs: int) -> dict:
    """images/s of train_module itself (data, augmentation, masks, checkpoints) on digits at 16×16."""
    splits = load_data("digits", (3, 16, 16), num_classes=10, seed=0)
    torch.manual_seed(0)
    net = _kaiming_(VGG19Narrow())
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) >= 0.9 for n, p in net.named_parameters() if p.dim() > 1}
    config = make_config(model="bench.onnx", epochs=epochs, batch_size=128, device=device.type, seed=0)
    with tempfile.TemporaryDirectory() as d:
        res = train_module(net, masks, splits, config, d, progress=False)
        hist = json.loads(Path(res.history_path).read_text())["epochs"]
    return {"model": "vgg19 (width 8) on digits 16x16, 90% sparse", "epochs": epochs, "batch": 128,
            "images_per_s": res.images_per_s, "per_epoch_images_per_s": [h["images_per_s"] for h in hist],
            "val_acc": res.val_acc}


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def render(entries: dict) -> str:
    lines = ["# Sparse-training benchmark", "",
             "Masked step = the same forward/backward/SGD step plus the mask hold of `stages.sparse_train` "
             "(gradient of pruned entries zeroed, weights re-masked after the step; force_core's MaskEnforcer, "
             "fused `_foreach_mul_`). Same model, batch and optimizer (SGD momentum 0.9, wd 5e-4), interleaved "
             "blocks in one process; medians. Target ratio ≤ 1.05. On a shared machine the step ratios carry the "
             "load's noise (a few %); the mask hold alone, timed by itself, is what a masked step really adds.", "",
             "| host | device | model | batch × image | dense ms/step | masked ms/step | masked ÷ dense (paired "
             "median) | ratio of medians | ratio of minima | mask hold alone, ms (÷ dense step) | dense img/s "
             "| masked img/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(entries):
        e = entries[key]
        for s in e["steps"]:
            dev = e["device"] if "cuda" in e["device"] else f"cpu ({s.get('threads', '?')} thread(s))"
            lines.append(f"| {e['host']} | {dev} | {s['model']} ({s['prunable_weights'] / 1e3:.0f}k weights) "
                         f"| {s['batch']} × {s['image']}² | {s['dense_ms']:.2f} | {s['masked_ms']:.2f} "
                         f"| **{s['ratio']:.3f}** | {s['ratio_of_medians']:.3f} | {s['ratio_of_minima']:.3f} "
                         f"| {s['hold_ms']:.3f} ({s['hold_fraction']:.2%}) "
                         f"| {s['dense_img_s']:.0f} | {s['masked_img_s']:.0f} |")
    lines += ["", "Throughput of the whole training loop (`train_module`: in-memory data, crop augmentation, mask "
              "hold; the per-epoch evaluation and checkpoint are not counted):", "",
              "| host | device | run | images/s (train) | val acc |", "|---|---|---|---|---|"]
    for key in sorted(entries):
        e = entries[key]
        t = e["loop"]
        dev = e["device"] if "cuda" in e["device"] else f"cpu ({t.get('threads', '?')} thread(s))"
        lines.append(f"| {e['host']} | {dev} | {t['model']}, {t['epochs']} epochs, batch {t['batch']} "
                     f"| {t['images_per_s']:.0f} | {t['val_acc']:.3f} |")
    stamp = {e["when"] for e in entries.values()}
    lines += ["", f"torch {torch.__version__}; measured {', '.join(sorted(stamp))}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--step-threads", type=int, default=1,
                    help="CPU threads for the step-ratio measurement (1: steadier on a shared machine; 0: default)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the throughput run")
    ap.add_argument("--results", default=str(RESULTS), help="directory for bench_train.json/md")
    args = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        print("no such device here", file=sys.stderr)
        return 3
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "bench_train.json"
    entries = json.loads(store.read_text()) if store.exists() else {}
    for name in devices:
        device = torch.device(name)
        cuda = device.type == "cuda"
        cases = [
            ("resnet20 (width 16)", ResNet20Narrow(width=16), 256 if cuda else 64, 32 if cuda else 16,
             8 if cuda else 3),
            ("vgg19 (width 8)", VGG19Narrow(width=8), 512 if cuda else 128, 16, 8 if cuda else 3),
        ]
        if cuda:
            cases.append(("resnet20 (width 64)", ResNet20Narrow(width=64), 256, 32, 8))
        threads = torch.get_num_threads()
        if not cuda and args.step_threads:
            torch.set_num_threads(args.step_threads)
        steps = [step_ratio(label, net, device, batch, image, args.rounds, n) for label, net, batch, image, n in cases]
        loop = loop_throughput(device, args.epochs)
        loop["threads"] = torch.get_num_threads()
        torch.set_num_threads(threads)
        for s in steps:
            print(f"{name}: {s['model']} batch {s['batch']}: dense {s['dense_ms']:.2f} ms, masked {s['masked_ms']:.2f} "
                  f"ms, ratio {s['ratio']:.3f}, masks exact {s['masks_exact']}", flush=True)
        print(f"{name}: train_module {loop['images_per_s']:.0f} images/s", flush=True)
        host = socket.gethostname()
        entries[f"{host}/{name}"] = {"host": host, "device": device_label(device), "steps": steps, "loop": loop,
                                     "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    store.write_text(json.dumps(entries, indent=1))
    (out / "bench_train.md").write_text(render(entries))
    print((out / "bench_train.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
