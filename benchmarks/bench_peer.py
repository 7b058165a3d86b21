"""Our channel cut beside the structural-pruning reference, Torch-Pruning, at equal size and at equal compute.

For each torchvision network at 224×224 (random init, 1000 classes, as `bench_structured.py`):
- the peer: Torch-Pruning's MagnitudePruner (L1 magnitude, one uniform ratio per layer, `round_to` 8, the
  classifier left alone) at `--ratio` of the channels, exported to ONNX the way ours is;
- ours, channel FORCE (20 steps of 16 digits images, blocks of `--multiple`, default the pipeline's: the block
  onnxruntime computes channels in on this machine) through our own stages:
  `params`: the parameter budget at the peer's count of prunable weights;
  `macs`: the MACs budget (the default) at the peer's MACs per image;
  `macs, peer's size`: the MACs budget at the sparsity where our cut has the peer's parameters (a secant search
  on the sparsity, each point a full mask computation; the search stops within 1% or after 5 points);
  `latency, peer's size`: the same under the latency budget (each layer timed alone at batch 32, cached);
  `--target-latency`: the latency budget at the sparsity our own search finds for 0.45 (resnet50) or 0.5
  (mobilenet_v2) of the dense latency at batch 32;
  `latency budget at the peer's latency`: --target-latency at the peer's own ratio at batch 32 (timed first), with
  --weight-sparsity at the peer's removed weights (at most its size: a second budget).
The latency rows at the peer's size and at its latency are repeated with `--channel-ranking per-group` (each channel's
saliency over its group's mean, instead of the saliency: the default, global).
All ten files (dense, peer, ours ×8) run in the same interleaved rounds under onnxruntime CPU at batch 1 and 32;
parameters and MACs are read from the files. For resnet50 the peer's file and our two at its latency are trained alike
on digits (10 epochs of our scratch recipe at batch 32, its learning rate scaled to the batch, 8 seeds, at 64×64:
224×224 would take hours a run on a CPU) for top-1 at equal latency.

    python benchmarks/bench_peer.py                          # resnet50 and mobilenet_v2
    python benchmarks/bench_peer.py --archs resnet50 --rounds 10

Writes benchmarks/results/bench_peer.md|json; our cuts are bench_structured's cells (runs/bench_structured/, reused
by a rerun), the peer's files go under runs/bench_peer/.
Torch-Pruning is a benchmark-only dependency (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_structured import DEFAULT_MULTIPLE  # noqa: E402 - after the path

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench_peer"
SIZE = 224
PEER_ROUND_TO = 8  # the peer
SEARCH_POINTS = 5
TARGETS = {"resnet50": 0.45, "mobilenet_v2": 0.5}  # issue 26's --target-latency at batch 32
# Where the search for the peer's size under --channel-ranking per-group starts: near the latency sparsity that kept
# resnet50's parameters there in a trial (0.7193: 0.271×); ranked per group, more parameters stay at each latency.
GROUPED_START = {"resnet50": 0.72, "mobilenet_v2": 0.72}
ACCURACY_ARCHS = ("resnet50",)  # issue 26's accuracy comparison at equal latency
ACCURACY_SEEDS = tuple(range(8))  # the issue asks 3; the seeds spread more than the methods differ
ACCURACY_EPOCHS = 10
ACCURACY_SIZE = 64
# 10 epochs of digits' 1,618 training images are 130 steps at the recipe's batch 128: resnet50 ended at 0.10-0.59 and
# the seeds spread more than the methods differed. At batch 32 (510 steps) with the recipe's lr 0.1 the peer diverged
# on 2 of 3 seeds; scaled with the batch (0.1 × 32/128) both train to 0.93-0.98.
ACCURACY_BATCH = 32
ACCURACY_LR = 0.1 * ACCURACY_BATCH / 128


def peer_cell(arch: str, ratio: float) -> dict:
    """Torch-Pruning's magnitude pruner at `ratio` of the channels of every layer, exported to ONNX."""
    import torch
    import torch_pruning as tp
    import torchvision

    out = WORK / arch / f"peer-{ratio:g}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None, num_classes=1000).eval()
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        x = torch.randn(1, 3, SIZE, SIZE)
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[head], round_to=PEER_ROUND_TO)
        pruner.step()
        torch.onnx.export(model.eval(), (torch.randn(2, 3, SIZE, SIZE),), str(out), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return {"method": f"Torch-Pruning, magnitude, uniform {ratio:g}, round_to {PEER_ROUND_TO}", "file": str(out),
            **_costs(out)}


def dense_cell(arch: str) -> dict:
    from stages.onnx_convert.torchvision_export import export_torchvision

    dense = WORK.parent / "bench_structured" / f"{arch}-{SIZE}" / "dense.onnx"  # bench_structured's, shared
    if not dense.exists():
        dense.parent.mkdir(parents=True, exist_ok=True)
        export_torchvision(arch, dense, num_classes=1000, input_size=(SIZE, SIZE))
    return {"method": "dense", "file": str(dense), **_costs(dense)}


def our_cell(arch: str, budget: str, sparsity: float, multiple: int, target_latency: float | None = None,
             weight_sparsity: float | None = None, ranking: str = "global") -> dict:
    """Channel FORCE under `budget` at `sparsity` (or at the sparsity its search finds for `target_latency` at batch
    32; with `weight_sparsity` removing that many weights as well; `ranking`: --channel-ranking):
    bench_structured's cell (compute_masks_stage, the proven cut)."""
    from bench_structured import cut_cell

    cell = cut_cell(arch, SIZE, sparsity, multiple, budget=budget, target_latency=target_latency, latency_batch=32,
                    weight_sparsity=weight_sparsity, ranking=ranking)
    asked = f"--sparsity {sparsity:.4f}" if target_latency is None else \
        f"--target-latency {target_latency:g} --latency-batch 32 (found --sparsity {cell['sparsity']:.4f})"
    if weight_sparsity is not None:
        asked += f" --weight-sparsity {weight_sparsity:.4f}"
    if ranking != "global":
        asked += f" --channel-ranking {ranking}"
    return {"method": f"ours, channel FORCE, --budget {budget} {asked}", "budget": budget,
            "sparsity": cell["sparsity"], "file": cell["cut"], "mask_seconds": cell["mask_seconds"],
            "parity_max_rel": cell["parity_max_rel"], "latency_probes": cell.get("latency_probes"),
            **_costs(Path(cell["cut"]))}


def _costs(path: Path) -> dict:
    import onnx

    from stages.onnx_convert.costs import model_costs

    c = model_costs(onnx.load(str(path)), (3, SIZE, SIZE))
    return {"params": c.params, "prunable_weights": c.prunable_weights, "macs": c.macs, "weight_macs": c.weight_macs}


def same_params(arch: str, target_params: int, start: dict, multiple: int, budget: str = "macs",
                ranking: str = "global") -> tuple[dict, list]:
    """Our cut under `budget` with the peer's parameter count: a secant search on the sparsity from `start` (a cut
    under that budget), kept params falling as the sparsity rises."""
    from pipeline.errors import BadInputError

    points = [start]
    lo_s, hi_s = 0.0, 0.99
    s = start["sparsity"]
    for _ in range(SEARCH_POINTS - 1):
        p = points[-1]
        if abs(p["params"] - target_params) <= 0.01 * target_params:
            break
        if p["params"] > target_params:
            lo_s = max(lo_s, p["sparsity"])
        else:
            hi_s = min(hi_s, p["sparsity"])
        if len(points) >= 2 and points[-1]["params"] != points[-2]["params"]:
            a, b = points[-2], points[-1]
            slope = (b["sparsity"] - a["sparsity"]) / (b["params"] - a["params"])
            s = b["sparsity"] + (target_params - b["params"]) * slope
        else:  # kept params scale about like the kept fraction: one proportional step
            s = 1 - (1 - p["sparsity"]) * target_params / p["params"]
        s = min(max(s, lo_s + 1e-3), (lo_s + hi_s) / 2 if s >= hi_s else hi_s - 1e-3)
        try:
            points.append(our_cell(arch, budget, round(s, 5), multiple, ranking=ranking))
        except BadInputError as e:  # beyond what the budget can remove: the largest reachable is named
            print(f"{arch}: --budget {budget} --sparsity {s:.4f}: {e}", flush=True)
            hi_s = s
    best = min(points, key=lambda c: (c["params"] > 1.01 * target_params, abs(c["params"] - target_params)))
    return best, [(c["sparsity"], c["params"]) for c in points]


def measure(cells: list[dict], batch: int, rounds: int) -> list[dict]:
    from stages.measure.latency import interleaved_latency
    from stages.onnx_convert import runtime

    sessions = [runtime.session(c["file"]) for c in cells]
    times = interleaved_latency(sessions, (3, SIZE, SIZE), batch=batch, runs=rounds, budget_s=float("inf"))
    return [{"p50": t["p50"], **({"ratio": t["ratio"]} if "ratio" in t else {})} for t in times]


def run(arch: str, ratio: float, rounds: int, multiple: int, peer_latency: float | None = None) -> dict:
    dense = dense_cell(arch)
    peer = peer_cell(arch, ratio)
    m = multiple
    ours_params = our_cell(arch, "params", round(1 - peer["prunable_weights"] / dense["prunable_weights"], 5), m)
    ours_macs = our_cell(arch, "macs", round(1 - peer["weight_macs"] / dense["weight_macs"], 5), m)
    ours_size, search = same_params(arch, peer["params"], ours_macs, m)
    ours_latency, latency_search = same_params(arch, peer["params"],
                                               our_cell(arch, "latency", ours_size["sparsity"], m), m, budget="latency")
    # ranked per group: more parameters at the same latency, so the search starts at a higher sparsity
    grouped_latency, grouped_search = same_params(arch, peer["params"],
                                                  our_cell(arch, "latency", GROUPED_START.get(arch, 0.7), m,
                                                           ranking="per-group"), m, budget="latency",
                                                  ranking="per-group")
    target = TARGETS.get(arch, 0.5)
    ours_target = our_cell(arch, "latency", 0.5, m, target_latency=target)
    # The peer's speed: its latency ratio at batch 32, timed first, is our --target-latency, with its removed weights
    # as --weight-sparsity (at most its size); the file is then trained beside the peer's for accuracy at equal speed.
    peer_ratio = peer_latency or round(measure([dense, peer], 32, rounds)[1]["ratio"]["median"], 3)
    peer_weights = round(1 - peer["prunable_weights"] / dense["prunable_weights"], 4)
    ours_match = our_cell(arch, "latency", 0.5, m, target_latency=peer_ratio, weight_sparsity=peer_weights)
    grouped_match = our_cell(arch, "latency", 0.5, m, target_latency=peer_ratio, weight_sparsity=peer_weights,
                             ranking="per-group")
    at_peer = f"latency budget at the peer's batch-32 latency ({peer_ratio:.3f}), weights at most the peer's"
    labels = ["dense", "peer", "ours, params budget, peer's size", "ours, macs budget, peer's MACs",
              "ours, macs budget, peer's size", "ours, latency budget, peer's size",
              "ours, ranked per group, latency budget, peer's size",
              f"ours, latency budget, --target-latency {target:g} at batch 32", f"ours, {at_peer}",
              f"ours, ranked per group, {at_peer}"]
    cells = [dense, peer, ours_params, ours_macs, ours_size, ours_latency, grouped_latency, ours_target, ours_match,
             grouped_match]
    latency = {b: measure(cells, b, rounds) for b in (1, 32)}
    rows = []
    for i, (label, c) in enumerate(zip(labels, cells, strict=True)):
        rows.append({"label": label, **{k: v for k, v in c.items() if k != "file"},
                     "params_ratio": c["params"] / dense["params"], "macs_ratio": c["macs"] / dense["macs"],
                     **{f"b{b}": latency[b][i] for b in latency}})
    accuracy = [accuracy_cell(arch, who, c["file"], seed)
                for who, c in (("peer", peer), ("ours", ours_match), ("ours, ranked per group", grouped_match))
                for seed in ACCURACY_SEEDS] if arch in ACCURACY_ARCHS else []
    return {"arch": arch, "ratio": ratio, "rows": rows, "search": search, "latency_search": latency_search,
            "grouped_search": grouped_search,
            "target": target, "target_probes": ours_target.get("latency_probes"), "peer_ratio": peer_ratio,
            "match_probes": ours_match.get("latency_probes"),
            "grouped_match_probes": grouped_match.get("latency_probes"),
            "accuracy": accuracy}


def accuracy_cell(arch: str, who: str, path: str, seed: int) -> dict:
    """Top-1 on digits' held-out split of the file at `path` after our scratch recipe (SGD, cosine, weight decay
    5e-4) at batch ACCURACY_BATCH and lr ACCURACY_LR for ACCURACY_EPOCHS epochs with `seed`, at ACCURACY_SIZE² (224²
    would take hours a run on this CPU; the channels are what is compared), the fused BatchNorms trained as our
    pipeline trains them."""
    import torch

    from force_core import add_train_norm
    from pipeline.config import make_config
    from pipeline.data import load_data
    from stages.import_onnx import import_onnx
    from stages.onnx_convert.to_torch import load_module
    from stages.sparse_train.training import train_module

    # Named by the file's folder and the batch: another run's file, or another recipe, trains again.
    slug = who.replace(", ", "-").replace(" ", "-")
    work = WORK / arch / "accuracy" / f"{slug}-{Path(path).parent.name}-b{ACCURACY_BATCH}-{seed}"
    done = work / "accuracy.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.manual_seed(seed)
    imported = import_onnx(path, work / "import", train_norm=True)
    module, _ = load_module(imported.normalized_path)
    norms = add_train_norm(module)
    config = make_config(model=str(path), epochs=ACCURACY_EPOCHS, seed=seed, device="cpu", recipe="scratch",
                         batch_size=ACCURACY_BATCH, lr=ACCURACY_LR)
    splits = load_data("digits", (3, ACCURACY_SIZE, ACCURACY_SIZE), num_classes=1000, seed=0, augment=True)
    t0 = time.perf_counter()
    result = train_module(module, {}, splits, config, work / "run", progress=False, plot=False, train_norms=norms)
    cell = {"who": who, "seed": seed, "top1": result.val_acc, "epochs": result.epochs, "size": ACCURACY_SIZE,
            "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(cell, indent=1))
    return cell


def render(results: list[dict], elapsed: float, rounds: int, multiple: int) -> str:
    lines = [f"# bench-peer: our channel cut beside Torch-Pruning at {SIZE}×{SIZE}", "",
             f"onnxruntime CPU ({platform.machine()}, {elapsed / 60:.1f} min), random init, 1000 classes. All files "
             f"of a network run in the same interleaved rounds ({rounds} at batch 1 and at batch 32); latency "
             "ratio = file ÷ dense per round, median (p10–p90). Ours: channel FORCE, 20 steps of 16 digits images, "
             f"blocks of {multiple}, every cut proven against its masked model.", "",
             "| model | method | params | MACs | latency ÷ dense, batch 1 | batch 32 |", "|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"][1:]:
            lat = [f"{row[f'b{b}']['ratio']['median']:.3f} ({row[f'b{b}']['ratio']['p10']:.2f}–"
                   f"{row[f'b{b}']['ratio']['p90']:.2f})" for b in (1, 32)]
            lines.append(f"| {r['arch']} | {row['label']}: {row['method']} | {row['params_ratio']:.3f}× | "
                         f"{row['macs_ratio']:.3f}× | {lat[0]} | {lat[1]} |")
        lines.append("")
        for key, budget in (("search", "macs"), ("latency_search", "latency"),
                            ("grouped_search", "latency --channel-ranking per-group")):
            lines.append(f"- {r['arch']}: the search for the peer's size under --budget {budget} (sparsity, params): "
                         + ", ".join(f"({s:.4f}, {p:,})" for s, p in r.get(key, ())))
        for what, key in ((f"--target-latency {r.get('target')}", "target_probes"),
                          (f"the peer's latency ({r.get('peer_ratio')})", "match_probes"),
                          (f"the peer's latency ({r.get('peer_ratio')}), ranked per group", "grouped_match_probes")):
            lines.append(f"- {r['arch']}: {what} probes (sparsity, ratio at batch 32): "
                         + ", ".join(f"({p['sparsity']:.4f}, {p['ratio']:.3f})" for p in r.get(key) or []))
        if r.get("accuracy"):
            who = dict.fromkeys(a["who"] for a in r["accuracy"])
            by = {w: [a for a in r["accuracy"] if a["who"] == w] for w in who}
            lines.append(f"- {r['arch']}: top-1 on digits' held-out split at equal latency (the peer and the last two "
                         "rows; "
                         f"{ACCURACY_EPOCHS} epochs of our scratch recipe at batch {ACCURACY_BATCH}, lr "
                         f"{ACCURACY_LR:g}, at {ACCURACY_SIZE}×{ACCURACY_SIZE}, "
                         "seeds " + ", ".join(map(str, ACCURACY_SEEDS)) + "): "
                         + "; ".join(f"{w} " + ", ".join(f"{a['top1']:.4f}" for a in v)
                                     + f" (mean {sum(a['top1'] for a in v) / len(v):.4f}, seeds 0–2 "
                                     f"{sum(a['top1'] for a in v[:3]) / 3:.4f})" for w, v in by.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--ratio", type=float, default=0.5, help="the peer's channel pruning ratio")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--multiple", type=int, default=DEFAULT_MULTIPLE, help="our channels kept in blocks of this many")
    ap.add_argument("--peer-latency", type=float, nargs="*", default=[],
                    help="per arch, the peer's batch-32 latency ratio to aim our equal-latency file at (default: timed "
                         "at the start; give an earlier run's to reuse its file)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    given = dict(zip(a.archs, a.peer_latency, strict=False))
    for arch in a.archs:
        results.append(run(arch, a.ratio, a.rounds, a.multiple, given.get(arch)))
        print(render(results, time.perf_counter() - t0, a.rounds, a.multiple), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_peer.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "bench_peer.md").write_text(render(results, time.perf_counter() - t0, a.rounds, a.multiple))
    return 0


if __name__ == "__main__":
    sys.exit(main())
