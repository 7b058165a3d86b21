"""Extreme sparsity on the exports users bring: FORCE's collapse guard and train-time normalization, measured.

The narrow VGG-19 and ResNet-20 of bench_accuracy.py at Kaiming initialization, exported twice: with their
BatchNormalization nodes, and as users' eval-mode exports are (BatchNorm folded into the convolutions by
constant folding, batch fixed at 1). Each cell goes through the pipeline's own stages (import → masks →
sparse-train → export) and is scored by onnxruntime on the held-out digits split. Variants:
  force            FORCE with the collapse guard (the default: nested selection once the outputs spread less than
                   a tenth of the dense network's)
  force_exact      the guard only where the outputs no longer depend on the input at all (collapse_ratio 0)
  force_paper      FORCE as published (on_collapse=none)
  iter_snip        Iterative SNIP
  snip             SNIP (fused exports only: the baseline of the issue's target)
  force_5b         FORCE with the guard, 5 batches per pruning step instead of 1 (fused exports only)
  force_no_norm    FORCE with the guard, without train-time normalization (fused exports only)

    python benchmarks/bench_extremes.py            # 2 nets × 2 exports × 99/99.5/99.8% × 3 seeds
    QUICK=1 python benchmarks/bench_extremes.py    # fused exports, 99.5%, seed 0

Writes benchmarks/results/bench_extremes[_quick].md|png|json; per-run work under runs/bench_extremes/ (kept, so an
interrupted grid resumes where it stopped). Beside each accuracy: layers left empty, effective density (kept
weights on an input→output path), the step at which the guard found a collapse, the smallest layer's kept count
and the per-step pruning loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_accuracy as ba  # noqa: E402  (the networks, their export and one pipeline cell)

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench_extremes"
SPARSITIES = (0.99, 0.995, 0.998)
SEEDS = (0, 1, 2)
EPOCHS = 15
EXPORTS = ("kept", "fused")
VARIANTS = {
    "force": {"method": "force", "on_collapse": "nested"},
    "force_exact": {"method": "force", "on_collapse": "nested", "collapse_ratio": 0.0},
    "force_paper": {"method": "force", "on_collapse": "none"},
    "iter_snip": {"method": "iter_snip"},
    "snip": {"method": "snip", "fused_only": True},
    "force_5b": {"method": "force", "batches_per_step": 5, "fused_only": True, "seeds": (0,)},
    "force_no_norm": {"method": "force", "train_norm": False, "fused_only": True, "seeds": (0,)},
}


def jobs_for(nets, exports, sparsities, seeds, variants, threads: int) -> list[dict]:
    from stages.import_onnx import import_onnx

    jobs = []
    for seed in seeds:  # seed by seed: an interrupted grid has whole seeds done (cells are kept and reused)
        for net in nets:
            for export in exports:
                base = WORK / f"{net}-{export}-w{ba.WIDTH}-s{seed}"
                onnx_path = base / "init.onnx"
                if not (base / "normalized.onnx").exists():
                    ba.export(net, seed, onnx_path, fused=export == "fused")
                    import_onnx(onnx_path, base, train_norm=True)
                common = {"net": net, "export": export, "seed": seed, "onnx": str(onnx_path),
                          "normalized": str(base / "normalized.onnx"), "threads": threads, "epochs": EPOCHS}
                for name in variants:
                    v = VARIANTS[name]
                    if (v.get("fused_only") and export != "fused") or seed not in v.get("seeds", (seed,)):
                        continue
                    for s in sparsities:
                        jobs.append({**common, "variant": name, "method": v["method"], "sparsity": s,
                                     "train_norm": v.get("train_norm", True),
                                     "batches_per_step": v.get("batches_per_step", 1),
                                     "collapse_ratio": v.get("collapse_ratio"),
                                     "on_collapse": v.get("on_collapse", "nested"),
                                     "dir": str(base / f"{name}-{s:g}")})
    return jobs


def run_cell(job: dict) -> dict:
    try:
        cell = ba.run_cell(job)
    except Exception as e:  # noqa: BLE001 - one failed cell must not lose the grid; reported at the end
        keys = ("net", "export", "variant", "sparsity", "seed")
        return {k: job[k] for k in keys} | {"error": f"{type(e).__name__}: {e}"}
    return cell | {k: job[k] for k in ("export", "variant", "batches_per_step")}


# --------------------------------------------------------------------------------------------- report


def _cells(cells, net, export, variant, s):
    return [c for c in cells if c["net"] == net and c["export"] == export and c["variant"] == variant
            and abs(c["sparsity"] - s) < 1e-9]


def _smallest(c: dict) -> int:
    return min(c["kept"].values()) if c.get("kept") else -1


def render(cells, nets, exports, sparsities, seeds, variants, elapsed: float, title: str) -> str:
    reused = sum(1 for c in cells if c.get("reused"))
    lines = [
        f"# Extreme sparsity on real exports ({title})",
        "",
        f"Digits at {ba.IMAGE}×{ba.IMAGE}, networks of first-stage width {ba.WIDTH} at Kaiming init; `kept` = exported "
        f"with BatchNormalization nodes, `fused` = eval-mode export with BatchNorm folded into the convolutions "
        f"(constant folding) and batch fixed at 1. Masks: 20 exponential steps × 1 batch of {ba.MASK_BATCH}; "
        f"{EPOCHS} epochs SGD (lr 0.1, momentum 0.9, wd 5e-4, cosine), batch {ba.BATCH}. Accuracy = onnxruntime "
        f"top-1 of the exported file on the held-out split (chance 0.100), median [min–max] over seeds "
        f"{', '.join(map(str, seeds))}; `d` = layers left empty (median); `eff` = effective density ÷ density "
        f"(median; 1 = every kept weight on an input→output path). Wall time {elapsed / 60:.1f} min"
        + (f" ({reused} of {len(cells)} cells reused from runs/bench_extremes/)" if reused else "")
        + f", torch {torch.__version__}, CPU.",
        "",
    ]
    for net in nets:
        for export in exports:
            sub = [c for c in cells if c["net"] == net and c["export"] == export]
            if not sub:
                continue
            lines += [f"## {net}, BatchNorm {export} ({sub[0]['n_layers']} prunable layers)", "",
                      "| variant | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |",
                      "|---|" + "---|" * len(sparsities)]
            for v in variants:
                row = []
                for s in sparsities:
                    cs = _cells(cells, net, export, v, s)
                    if not cs:
                        row.append("–")
                        continue
                    accs = [c["ort_val_acc"] for c in cs]
                    rng = f" [{min(accs):.3f}–{max(accs):.3f}]" if len(accs) > 1 else ""
                    d = statistics.median(c["disconnected"] for c in cs)
                    effs = [c["effective_density"] / c["density"] for c in cs if c.get("effective_density") is not None]
                    eff = f" eff={statistics.median(effs):.2f}" if effs else ""
                    row.append(f"{statistics.median(accs):.3f}{rng} d={d:g}{eff}")
                if any(r != "–" for r in row):
                    lines.append(f"| {v} | " + " | ".join(row) + " |")
            lines.append("")
    lines += ["## Per cell (seed by seed)", "",
              "| net | export | variant | sparsity | seed | top-1 | empty layers | smallest layer keeps | eff. density "
              "| collapse at step | pruning loss at steps 1, 5, 10, 15, 20 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["net"], c["export"], c["variant"], c["sparsity"], c["seed"])):
        losses = c.get("step_losses") or []
        pick = ", ".join(f"{losses[i - 1]:.2f}" for i in (1, 5, 10, 15, 20) if i <= len(losses))
        eff = f"{c['effective_density']:.5f}" if c.get("effective_density") is not None else "–"
        lines.append(f"| {c['net']} | {c['export']} | {c['variant']} | {100 * c['sparsity']:g}% | {c['seed']} | "
                     f"{c['ort_val_acc']:.3f} | {c['disconnected']} | {_smallest(c)} | {eff} | "
                     f"{c.get('collapse_step') or '–'} | {pick} |")
    lines += ["", "Per-layer kept counts of every cell are in the JSON beside this file (`kept`, `sizes`).", ""]
    return "\n".join(lines)


def plot(cells, path: Path, sparsity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in cells if abs(c["sparsity"] - sparsity) < 1e-9 and c["seed"] == min(x["seed"] for x in cells)
             and c.get("step_losses")]
    keys = sorted({(c["net"], c["export"]) for c in shown})
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, (net, export) in zip(axes[0], keys, strict=True):
        for c in shown:
            if (c["net"], c["export"]) == (net, export):
                per_step = c.get("batches_per_step", 1)  # one loss per pruning batch
                steps = [(i + 1) / per_step for i in range(len(c["step_losses"]))]
                ax.plot(steps, c["step_losses"], marker=".", label=f"{c['variant']} ({c['ort_val_acc']:.2f})")
        ax.axhline(2.302585, color="grey", ls=":", lw=1, label="ln 10")
        ax.set_title(f"{net}, BN {export}, {100 * sparsity:g}%")
        ax.set_xlabel("pruning step")
        ax.set_ylabel("loss at the current mask")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=ba.quick_from_env(), help="fused exports, 99.5%%, seed 0")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument("--nets", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--variants", nargs="*", default=None)
    args = ap.parse_args(argv)

    nets = args.nets or list(ba.NETS)
    exports = ("fused",) if args.quick else EXPORTS
    sparsities = (0.995,) if args.quick else SPARSITIES
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else SEEDS)
    variants = args.variants or list(VARIANTS)
    tag = "_quick" if args.quick else ""
    t0 = time.perf_counter()
    jobs = jobs_for(nets, exports, sparsities, seeds, variants, 1 if args.jobs > 1 else torch.get_num_threads())
    cells = ba.run_grid(jobs, args.jobs, run_cell, _progress, t0)
    elapsed = time.perf_counter() - t0
    ok = [c for c in cells if "error" not in c]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bench_extremes{tag}.json").write_text(json.dumps(cells, indent=1))
    title = "QUICK" if args.quick else "full grid"
    md = render(ok, nets, exports, sparsities, seeds, variants, elapsed, title)
    (RESULTS / f"bench_extremes{tag}.md").write_text(md)
    plot(ok, RESULTS / f"bench_extremes{tag}.png", 0.995)
    print(md)
    for e in (c for c in cells if "error" in c):
        print("FAILED", e, file=sys.stderr)
    return 1 if len(ok) < len(cells) else 0


def _progress(i: int, n: int, cell: dict, t0: float) -> None:
    print(f"[{i}/{n} {time.perf_counter() - t0:6.0f}s] {cell['net']} {cell['export']} {cell['variant']:13s} "
          f"{100 * cell['sparsity']:g}% seed {cell['seed']}: acc {cell.get('ort_val_acc', float('nan')):.3f} "
          f"collapse {cell.get('collapse_step')} {cell.get('error', '')} ({cell.get('seconds', 0):.0f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
