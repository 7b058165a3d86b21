"""What channel pruning buys where the model runs: dense vs channel-cut torchvision networks under onnxruntime
CPU, and accuracy on digits after the same training for unstructured FORCE, channel FORCE and channel magnitude.

Speed: resnet18, resnet50, mobilenet_v2 and squeezenet1_1 (Concat) at 224×224 and 64×64, exported at
initialization (1000 classes). Each goes through the pipeline's own stages: import_onnx → compute_masks_stage
(channel FORCE, 20 steps, digits images resized to the input, channels in blocks of 8: the default) → cut_stage
(which proves the cut against the masked model before anything is written). Dense and cut files then run side by
side (interleaved rounds, ≥ 30 each) at batch 1 and 32; file size and MACs come from the files.

Accuracy: the default model (resnet18, 32×32, 10 classes) through `run_all` with the default recipe (10 epochs)
at 50% of the prunable weights removed.

    python benchmarks/bench_structured.py          # full
    QUICK=1 python benchmarks/bench_structured.py  # resnet18 only, 64×64, 30 rounds at batch 1 and 8
    python benchmarks/bench_structured.py --archs resnet50 --sizes 224 --multiple 16   # one part, other blocks

Writes benchmarks/results/bench_structured[_quick].md|json; per-run work under runs/bench_structured/ (kept: a
rerun reuses finished cuts and accuracy runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench_structured"
ARCHS = ("resnet18", "resnet50", "mobilenet_v2", "squeezenet1_1")
SIZES = (224, 64)
SPARSITIES = (0.5, 0.75)
BATCHES = (1, 32)
ROUNDS = 30
MASK_STEPS = 20
MASK_BATCH = 16
ACCURACY_CELLS = (("unstructured", "force"), ("channel", "force"), ("channel", "magnitude"))
ACCURACY_SPARSITY = 0.5


def _default_multiple() -> int:
    """The pipeline's default block: the one onnxruntime on this machine computes channels in."""
    from stages.onnx_convert.runtime import channel_block

    return channel_block("cpu")


DEFAULT_MULTIPLE = _default_multiple()
UNNAMED_MULTIPLE = 8  # the block of the cells cut before the default followed the runtime: their folders carry none


def quick_from_env() -> bool:
    return os.environ.get("QUICK", "").strip() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------- speed


def cut_cell(arch: str, size: int, sparsity: float, multiple: int, budget: str = "params",
             target_latency: float | None = None, latency_batch: int = 1, weight_sparsity: float | None = None,
             ranking: str = "global") -> dict:
    """Export, import, channel FORCE masks under `budget` and the proven cut of one network; cached in its work
    directory. `target_latency`: the sparsity is searched for that latency ratio at `latency_batch` instead;
    `weight_sparsity`: the weights removed as well (a second budget); `ranking`: --channel-ranking."""
    from pipeline.data import load_data, mask_batches
    from stages.compute_masks import compute_masks_stage
    from stages.cut_channels import cut_graph
    from stages.import_onnx import import_onnx
    from stages.onnx_convert.torchvision_export import export_torchvision

    base = WORK / f"{arch}-{size}"
    dense = base / "dense.onnx"
    if not (base / "normalized.onnx").exists():
        export_torchvision(arch, dense, num_classes=1000, input_size=(size, size))
        import_onnx(dense, base)
    what = f"{sparsity:g}" if target_latency is None else f"target{target_latency:g}-b{latency_batch}"
    out = base / (f"channel-{what}" + ("" if multiple == UNNAMED_MULTIPLE else f"-m{multiple}")
                  + ("" if budget == "params" else f"-{budget}")
                  + ("" if weight_sparsity is None else f"-w{weight_sparsity:g}")
                  + ("-per-group" if ranking == "per-group" else ""))  # cells cut before per-group ranking: none
    done = out / "cut.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = load_data("digits", (3, size, size), num_classes=1000, seed=0, augment=False)
    batches = mask_batches(splits, MASK_BATCH, MASK_STEPS, seed=0)
    masks = compute_masks_stage(base / "normalized.onnx", out / "masks.npz", method="force", density=1 - sparsity,
                                steps=MASK_STEPS, batches=batches, seed=0, device="cpu", structure="channel",
                                channel_multiple=multiple, budget=budget, latency_batch=latency_batch,
                                target_latency=target_latency, weight_sparsity=weight_sparsity,
                                channel_ranking=ranking)
    t_masks = time.perf_counter() - t0
    meta = json.loads(masks.meta_path.read_text())
    images = batches[0][0][:8].numpy()
    cut = cut_graph(base / "normalized.onnx", masks.masks_path, out, images=images)
    cell = {"arch": arch, "size": size, "sparsity": meta["target_sparsity"], "multiple": multiple, "budget": budget,
            "ranking": ranking,
            "latency_probes": meta.get("latency_probes"),
            "dense": str(dense),
            "cut": str(cut.cut_path),
            "weights_removed": 1 - cut.costs_after["prunable_weights"] / cut.costs_before["prunable_weights"],
            "channels_kept": cut.channels_kept, "channels_total": cut.channels_total,
            "parity_max_rel": cut.parity_max_rel, "macs_dense": cut.costs_before["macs"],
            "macs_cut": cut.costs_after["macs"], "params_dense": cut.costs_before["params"],
            "params_cut": cut.costs_after["params"], "bytes_dense": dense.stat().st_size,
            "bytes_cut": cut.cut_path.stat().st_size, "mask_seconds": round(t_masks, 1),
            "blocked": meta.get("blocked", [])}
    done.write_text(json.dumps(cell, indent=1))
    return cell


def measure(cell: dict, batch: int, rounds: int) -> dict:
    from stages.measure.latency import paired_latency
    from stages.onnx_convert import runtime

    shape = (3, cell["size"], cell["size"])
    lat = paired_latency(runtime.session(cell["dense"]), runtime.session(cell["cut"]), shape, batch=batch, runs=rounds,
                         budget_s=float("inf"))
    return {"batch": batch, "dense_p50_ms": lat["input"]["p50"], "cut_p50_ms": lat["exported"]["p50"],
            "rounds": lat["input"]["runs"], **{f"ratio_{k}": v for k, v in lat["ratio"].items() if k != "batch"}}


# --------------------------------------------------------------------------------------------- accuracy


def accuracy_cell(structure: str, method: str, sparsity: float) -> dict:
    from pipeline.config import make_config
    from stages.onnx_convert.torchvision_export import export_torchvision
    from stages.run.calls import call_stage
    from stages.run.order import run_all

    model = WORK / "accuracy" / "resnet18.onnx"
    if not model.exists():
        export_torchvision("resnet18", model, num_classes=10, input_size=(32, 32))
    done = WORK / "accuracy" / f"{structure}-{method}-{sparsity:g}.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    config = make_config(model=str(model), structure=structure, method=method, sparsity=sparsity, device="cpu",
                         runs_dir=str(WORK / "accuracy" / "runs"), registry=str(WORK / "accuracy" / "registry"),
                         min_accuracy=0.0)
    s = run_all(config, call_stage)
    cell = {"structure": structure, "method": method, "sparsity": sparsity, "top1": s.top1,
            "weights_removed": s.sparsity, "macs_input": s.costs["input"]["macs"],
            "macs_exported": s.costs["exported"]["macs"], "params_exported": s.costs["exported"]["params"],
            "bytes_exported": s.sizes["exported"], "latency_ratio_b1": s.latency_ms["ratio"]["median"],
            "seconds": round(time.perf_counter() - t0, 1), "stage_seconds": s.stage_seconds}
    done.write_text(json.dumps(cell, indent=1))
    return cell


# --------------------------------------------------------------------------------------------- report


def render(speed: list[dict], accuracy: list[dict], elapsed: float, title: str, multiple: int) -> str:
    lines = [f"# bench-structured ({title})", "",
             f"onnxruntime CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
             f"{elapsed / 60:.1f} min. Latency: dense and cut files run in alternating rounds, median of each; "
             "ratio = cut ÷ dense per round, median with p10–p90. Masks: channel FORCE, 20 steps of "
             f"{MASK_BATCH} digits images, channels in blocks of {multiple}; each cut proven against its masked model "
             "(max relative difference shown) before it is written.", "",
             "| model | input | weights removed | channels kept | batch | dense p50 ms | cut p50 ms | ratio (p10–p90) "
             "| file dense → cut MB | MACs dense → cut (M) | cut parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in speed:
        for m in c["latency"]:
            lines.append(
                f"| {c['arch']} | {c['size']}×{c['size']} | {c['weights_removed']:.3f} (target {c['sparsity']:g}) "
                f"| {c['channels_kept']} / {c['channels_total']} | {m['batch']} | {m['dense_p50_ms']:.2f} "
                f"| {m['cut_p50_ms']:.2f} | {m['ratio_median']:.3f} ({m['ratio_p10']:.3f}–{m['ratio_p90']:.3f}) "
                f"| {c['bytes_dense'] / 1e6:.1f} → {c['bytes_cut'] / 1e6:.1f} "
                f"({c['bytes_cut'] / c['bytes_dense']:.3f}×) "
                f"| {c['macs_dense'] / 1e6:,.0f} → {c['macs_cut'] / 1e6:,.0f} | {c['parity_max_rel']:.1e} |")
    blocked = {c["arch"]: c["blocked"] for c in speed if c["blocked"]}
    if blocked:
        lines += ["", "Channels kept whole (named by node):", ""]
        lines += [f"- {arch}: " + "; ".join(b[:3]) + (f" and {len(b) - 3} more" if len(b) > 3 else "")
                  for arch, b in blocked.items()]
    if accuracy:
        lines += ["", f"## Accuracy on digits: resnet18 32×32, default recipe (10 epochs), "
                      f"{ACCURACY_SPARSITY:g} of prunable weights removed", "",
                  "| structure | method | top-1 (onnxruntime, held out) | weights removed | MACs input → exported (M) "
                  "| file MB | latency ratio, batch 1 | time s |", "|---|---|---|---|---|---|---|---|"]
        for a in accuracy:
            lines.append(f"| {a['structure']} | {a['method']} | {a['top1']:.4f} | {a['weights_removed']:.4f} "
                         f"| {a['macs_input'] / 1e6:,.1f} → {a['macs_exported'] / 1e6:,.1f} "
                         f"| {a['bytes_exported'] / 1e6:.2f} | {a['latency_ratio_b1']:.3f} | {a['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=quick_from_env())
    ap.add_argument("--archs", nargs="*", default=None)
    ap.add_argument("--sizes", nargs="*", type=int, default=None)
    ap.add_argument("--sparsities", nargs="*", type=float, default=None)
    ap.add_argument("--multiple", type=int, default=DEFAULT_MULTIPLE, help="channels kept in blocks of this many")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    archs = args.archs or (["resnet18"] if args.quick else list(ARCHS))
    sizes, batches, rounds = ((64,), (1, 8), ROUNDS) if args.quick else (SIZES, BATCHES, ROUNDS)
    sizes, sparsities = tuple(args.sizes or sizes), tuple(args.sparsities or SPARSITIES)
    partial = args.archs or args.sizes or args.sparsities or args.no_accuracy or args.multiple != DEFAULT_MULTIPLE
    tag = "_quick" if args.quick else ("_partial" if partial else "")
    tag += "" if args.multiple == DEFAULT_MULTIPLE else f"_m{args.multiple}"
    t0 = time.perf_counter()
    speed = []
    for arch in archs:
        for size in sizes:
            for sparsity in sparsities:
                cell = cut_cell(arch, size, sparsity, args.multiple)
                cell["latency"] = [measure(cell, b, rounds) for b in batches]
                speed.append(cell)
                print(f"[{time.perf_counter() - t0:6.0f}s] {arch} {size} {sparsity:g}: removed "
                      f"{cell['weights_removed']:.3f}, ratios "
                      + ", ".join(f"b{m['batch']} {m['ratio_median']:.3f}" for m in cell["latency"]), flush=True)
    accuracy = []
    if not partial and not args.quick:
        for structure, method in ACCURACY_CELLS:
            accuracy.append(accuracy_cell(structure, method, ACCURACY_SPARSITY))
            print(f"[{time.perf_counter() - t0:6.0f}s] accuracy {structure} {method}: {accuracy[-1]['top1']:.4f}",
                  flush=True)
    elapsed = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bench_structured{tag}.json").write_text(json.dumps({"speed": speed, "accuracy": accuracy}, indent=1))
    title = "QUICK" if args.quick else ("partial" if tag else "full")
    (RESULTS / f"bench_structured{tag}.md").write_text(render(speed, accuracy, elapsed, title, args.multiple))
    print((RESULTS / f"bench_structured{tag}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
