"""Speed and memory of force_core.compute_masks (issue 2): `make bench-masks`.

torchvision resnet18, 10 classes, Kaiming-normal init (fan-in, ReLU gain: the paper's), 32x32
inputs, batch 64, FORCE with 20 steps to density 0.01, on CPU. Writes benchmarks/results/bench_masks.md.

1. overhead = FORCE wall time / (steps x one plain forward+backward of the same model and batch),
   for resnet18 and for resnet50 (same setting; `--nets resnet18` skips resnet50);
2. speed-up over a straightforward implementation that deep-copies the network every step and
   ranks with a full `topk` (the published code's way), in the same run, checking the masks agree;
3. memory = (peak RSS of a fresh process that runs compute_masks - peak RSS of a fresh process that
   runs one plain forward+backward) / parameter bytes. Both child processes build the same model
   and batch and run one plain forward+backward first, so imports, the model, the batch and the
   allocator's warm pools cancel out; the peak is VmHWM of /proc/self/status (Linux).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import force_core  # noqa: E402

STEPS, DENSITY, BATCH, SIZE = 20, 0.01, 64, 32
TARGETS = {"overhead": 1.3, "speedup": 3.0, "memory": 2.5}
NETS = ("resnet18", "resnet50")


def setup(seed: int = 0, arch: str = "resnet18"):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=10)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return model.train(), x, y


def plain_pass(model, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def force_masks(model, x, y):
    return force_core.compute_masks(model, [(x, y)], method="force", density=DENSITY, steps=STEPS)


def passes_done(masks) -> str:
    """How many forward+backward passes compute_masks made (one per recorded loss), and the collapse step:
    the collapse guard adds a pass, and a forward, when the final mask has cut the network."""
    return f"{len(masks.meta['step_losses'])} ({masks.meta.get('collapse_step') or 'none'})"


def timed(fn, into: list):
    """Runs fn, appends (wall seconds, process CPU seconds) to `into`, returns fn's result."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    into.append((time.perf_counter() - w, time.process_time() - c))
    return out


def measure_overhead(arch: str, rounds: int = 2) -> dict:
    """FORCE ÷ (steps × one plain forward+backward) for `arch`, measurements interleaved as in `main`."""
    model, x, y = setup(arch=arch)
    for _ in range(2):  # warm-up
        plain_pass(model, x, y)
    passes, forces = [], []
    masks = None
    for _ in range(rounds):
        for _ in range(5):
            timed(lambda: plain_pass(model, x, y), passes)
        masks = timed(lambda: force_masks(model, x, y), forces)
    t_pass, c_pass = statistics.median(p[0] for p in passes), statistics.median(p[1] for p in passes)
    t_force, c_force = min(f[0] for f in forces), min(f[1] for f in forces)
    return {
        "arch": arch,
        "n": masks.total(),
        "overhead": t_force / (STEPS * t_pass),
        "overhead_cpu": c_force / (STEPS * c_pass),
        "t_pass": t_pass,
        "t_force": t_force,
        "passes": len(passes),
        "forces": len(forces),
        "masks": masks,
    }


def deepcopy_force(model, x, y, *, density=DENSITY, steps=STEPS):
    """FORCE the published code's way: a deep copy of the network and mask variables per step,
    scores |∂L/∂c| for weights θ0·c, a full `topk` over all N scores; exactly k kept, ties by lowest
    index (our rule, so the masks can be compared)."""
    names = list(force_core.prunable_parameters(model))
    theta0 = [model.get_parameter(n).detach() for n in names]
    sizes = [t.numel() for t in theta0]
    n_total = sum(sizes)
    keep = torch.ones(n_total, dtype=torch.bool)
    for d in force_core.density_schedule(density, steps, "exp"):
        k = force_core.kept_count(d, n_total)
        net = copy.deepcopy(model)
        cs = []
        for n, t, m in zip(names, theta0, keep.split(sizes), strict=True):
            mod = net.get_submodule(n.rsplit(".", 1)[0])
            c = m.view_as(t).float().requires_grad_(True)
            del mod.weight
            mod.weight = t * c  # θ0 ⊙ c in the forward pass
            cs.append(c)
        F.cross_entropy(net(x), y).backward()
        scores = torch.cat([c.grad.abs().flatten() for c in cs])
        tau = torch.topk(scores, k, sorted=True).values[-1]  # as the published code does
        keep = scores > tau
        ties = (scores == tau).nonzero().squeeze(1)
        keep[ties[: k - int(torch.count_nonzero(keep))]] = True
    return dict(zip(names, (m.view_as(t) for m, t in zip(keep.split(sizes), theta0, strict=True)), strict=True))


def child(kind: str) -> None:
    model, x, y = setup()
    plain_pass(model, x, y)
    if kind == "masks":
        force_masks(model, x, y)
    # VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's peak across exec).
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kib": int(hwm.split()[1])}))


def peak_kib(kind: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_kib"]


def main(nets: list[str]) -> None:
    load_before = os.getloadavg()
    model, x, y = setup()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_prunable = sum(p.numel() for p in force_core.prunable_parameters(model).values())

    for _ in range(2):  # warm-up
        plain_pass(model, x, y)
    # Interleave the measurements so that load from other processes hits all of them alike.
    # Wall time is the figure; process CPU time is recorded beside it because it moves less when
    # other processes share the cores.
    passes, forces, refs = [], [], []
    masks = ref = None
    for _ in range(2):
        for _ in range(5):
            timed(lambda: plain_pass(model, x, y), passes)
        masks = timed(lambda: force_masks(model, x, y), forces)
        ref = timed(lambda: deepcopy_force(model, x, y), refs)
    t_pass, c_pass = statistics.median(p[0] for p in passes), statistics.median(p[1] for p in passes)
    t_force, c_force = min(f[0] for f in forces), min(f[1] for f in forces)
    t_ref, c_ref = min(r[0] for r in refs), min(r[1] for r in refs)
    same = all(torch.equal(masks[n], ref[n]) for n in masks)
    iou = sum(int(torch.count_nonzero(masks[n] & ref[n])) for n in masks) / sum(
        int(torch.count_nonzero(masks[n] | ref[n])) for n in masks
    )

    peak_plain, peak_masks = peak_kib("plain"), peak_kib("masks")
    extra = (peak_masks - peak_plain) * 1024 / param_bytes

    overhead = t_force / (STEPS * t_pass)
    speedup = t_ref / t_force
    overhead_cpu, speedup_cpu = c_force / (STEPS * c_pass), c_ref / c_force
    others = [measure_overhead(arch) for arch in nets if arch != "resnet18"]
    rows = [
        (
            "overhead: FORCE ÷ (steps × fwd+bwd), resnet18",
            f"{overhead:.2f}",
            f"≤ {TARGETS['overhead']}",
            overhead <= TARGETS["overhead"],
        ),
        *[
            (
                f"overhead: FORCE ÷ (steps × fwd+bwd), {o['arch']}",
                f"{o['overhead']:.2f}",
                f"≤ {TARGETS['overhead']}",
                o["overhead"] <= TARGETS["overhead"],
            )
            for o in others
        ],
        (
            "speed-up over deep-copy + full topk",
            f"{speedup:.2f}×",
            f"≥ {TARGETS['speedup']}×",
            speedup >= TARGETS["speedup"],
        ),
        ("extra peak memory ÷ parameter memory", f"{extra:.2f}", f"≤ {TARGETS['memory']}", extra <= TARGETS["memory"]),
    ]
    load_after = os.getloadavg()
    lines = [
        "# bench-masks: force_core.compute_masks speed and memory",
        "",
        f"resnet18 (10 classes, Kaiming fan-in init), {SIZE}×{SIZE}, batch {BATCH}, FORCE {STEPS} steps (exp) "
        f"to density {DENSITY}, CPU; N = {n_prunable:,} prunable weights, parameters {param_bytes / 2**20:.1f} MiB.",
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {'yes' if ok else 'no'} |" for a, b, c, ok in rows],
        "",
        "| raw | value |",
        "|---|---|",
        f"| same two ratios in process CPU time | overhead {overhead_cpu:.2f}, speed-up {speedup_cpu:.2f}× |",
        f"| one forward+backward (median of {len(passes)}) | {t_pass * 1e3:.1f} ms |",
        f"| compute_masks FORCE (best of {len(forces)}) | {t_force:.2f} s ({t_force / STEPS * 1e3:.1f} ms/step) |",
        f"| deep-copy implementation (best of {len(refs)}) | {t_ref:.2f} s ({t_ref / STEPS * 1e3:.1f} ms/step) |",
        f"| same masks as the deep-copy implementation | {'identical' if same else f'no (IoU {iou:.3f})'} |",
        f"| peak RSS: plain fwd+bwd / compute_masks | {peak_plain / 1024:.0f} MiB / {peak_masks / 1024:.0f} MiB |",
        f"| kept / disconnected layers | {masks.total_kept():,} / {len(masks.disconnected)} |",
        f"| fwd+bwd passes made (collapse step) | {passes_done(masks)} |",
        *[
            line
            for o in others
            for line in (
                f"| {o['arch']}: N, overhead in process CPU time | {o['n']:,}, {o['overhead_cpu']:.2f} |",
                f"| {o['arch']}: one forward+backward (median of {o['passes']}) | {o['t_pass'] * 1e3:.1f} ms |",
                f"| {o['arch']}: compute_masks FORCE (best of {o['forces']}) | {o['t_force']:.2f} s "
                f"({o['t_force'] / STEPS * 1e3:.1f} ms/step) |",
                f"| {o['arch']}: fwd+bwd passes made (collapse step) | {passes_done(o['masks'])} |",
            )
        ],
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}; "
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(the machine is shared: other processes' load slows every figure, ratios less so).",
        "",
    ]
    text = "\n".join(lines)
    out = ROOT / "benchmarks" / "results" / "bench_masks.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["plain", "masks"], help="internal: one memory measurement")
    parser.add_argument(
        "--nets", default=",".join(NETS), help=f"comma-separated networks whose overhead is measured (default {NETS})"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child)
    else:
        main([n for n in args.nets.split(",") if n])
