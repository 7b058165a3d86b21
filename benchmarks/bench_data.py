"""Data at scale (issue 23): does memory stay flat as the data set grows, and does the training loop keep up with a
plain torchvision loop reading the same files?

1. Memory. Synthetic JPEG folders made here (224x224, 10 classes; benchmarks/synthetic_images.py) of 2,000 and
   20,000 images, and the same images as WebDataset shards. For each, `force-compress compress MODEL --data ...
   --epochs 1 --no-prefect` runs as a user runs it, in a subprocess, while this script samples the resident memory
   of its whole process tree (the run and its DataLoader workers; PSS, so the pages a forked worker shares with the
   run and the libraries every process maps count once) every 0.2 s. Target: peak at 20,000 ≤ 1.10x peak
   at 2,000, per source. QUICK bounds each run with `--max-steps 20 --val-images 500` instead of a whole epoch
   (the same streaming path: the file lists, the split and the workers are all there; ~25 minutes become ~5).
2. Throughput. In this process, on the 2,000-image folder and the same model, interleaved rounds of
   - the reference: torchvision `ImageFolder` + `DataLoader` (the same workers, batch, transforms: resize to the
     model's input, random crop with padding, flip, normalise) feeding a plain SGD step;
   - ours: `stages.sparse_train.training.train_module` (masks held, the pipeline's loader) for the same steps.
   Target: our images/s ≥ 0.9x the reference's (median over rounds).

The model: a small CNN (4 convolutions, BatchNorm; 224x224 in, at initialization, exported to ONNX here) so that
data, not arithmetic, is what the loop waits on: a resnet18 on 2 cores trains at a rate any loader keeps up with,
which would prove nothing about the loader (and take hours an epoch at 20,000 images).

    python benchmarks/bench_data.py            # --epochs 1 runs (~25 minutes on 2 cores)
    QUICK=1 python benchmarks/bench_data.py    # --max-steps runs (~5 minutes once the images are made)

Writes benchmarks/results/bench_data[_quick].md|json; the image sets and finished cells stay under runs/bench_data/
(an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic_images import write_folder, write_shards  # noqa: E402

QUICK = bool(os.environ.get("QUICK"))
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "bench_data"
SIZES = (2000, 20000)
IMAGE = 224
BATCH = 64
WORKERS = max(1, min(8, os.cpu_count() or 1))
ROUNDS = 3
STEPS = 12  # optimizer steps per throughput round
BOUND = ["--max-steps", "20", "--val-images", "500"] if QUICK else ["--epochs", "1"]
TAG = "_quick" if QUICK else ""


def small_cnn() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def model_file() -> Path:
    path = WORK / "small_cnn_224.onnx"
    if not path.exists():
        torch.manual_seed(0)
        net = small_cnn().eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(net, (torch.zeros(1, 3, IMAGE, IMAGE),), str(tmp), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17)
        tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------- memory


def _pss(pid: int) -> int:
    """Proportional set size of `pid` in bytes: its private pages plus its share of pages it shares (the libraries
    every worker maps, the pages a forked worker still shares with the run), so a tree's sum counts each page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_memory(pid: int) -> int:
    """Resident bytes (PSS) of `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _pss(p)
        todo += children.get(p, [])
    return total


def memory_cell(spec: str, model: Path, name: str) -> dict:
    work = WORK / "cells" / name
    cmd = [str(Path(sys.executable).parent / "force-compress"), "compress", str(model), "--data", spec, *BOUND,
           "--no-prefect", "--json", "--min-accuracy", "0", "--recipe", "scratch", "--workers", str(WORKERS),
           "--runs-dir", str(work / "runs"), "--registry", str(work / "registry")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_memory(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: compress exited {proc.returncode}: {err[-2000:]}")
    summary = json.loads(out)
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["epochs"]
    return {"cell": name, "spec": spec, "peak_pss_mib": round(peak[0] / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 1), "train_images_per_s": round(history[-1]["images_per_s"], 1),
            "held": summary["data"]["held"], "train_images": summary["data"]["train_images"],
            "top1": summary["top1"]}


# --------------------------------------------------------------------------------------------- throughput


def _reference_rate(module: nn.Module, folder: Path, steps: int) -> float:
    """images/s of torchvision ImageFolder + DataLoader feeding plain SGD steps (what a user would write)."""
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((IMAGE, IMAGE)), transforms.RandomCrop(IMAGE, padding=IMAGE // 8),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.25] * 3)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=BATCH, shuffle=True,
                                         num_workers=WORKERS, persistent_workers=True, prefetch_factor=4)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    module.train()
    t0, n = time.perf_counter(), 0  # from starting the workers, as our loop's epoch time is
    it = iter(loader)
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()
        n += len(y)
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def _our_rate(module: nn.Module, splits, steps: int, work: Path) -> float:
    from pipeline.config import CompressConfig
    from stages.sparse_train.training import train_module

    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in module.named_parameters() if p.dim() > 1}
    config = CompressConfig(model="x.onnx", max_steps=steps, batch_size=BATCH, lr=0.01, recipe="scratch",
                            device="cpu")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    result = train_module(module, masks, splits, config, work, progress=False, plot=False)
    return result.images_per_s


def throughput(folder: Path) -> dict:
    from pipeline.data import load_data
    from stages.onnx_convert.to_torch import load_module

    normalized = next((WORK / "cells" / f"folder_{SIZES[0]}" / "runs").glob("*/normalized.onnx"))  # as imported
    module, _ = load_module(normalized)
    splits = load_data(f"imagefolder:{folder}", (3, IMAGE, IMAGE), num_classes=10, memory_mb=0, workers=WORKERS)
    ref, ours = [], []
    for r in range(ROUNDS):
        ref.append(_reference_rate(module, folder, STEPS))
        ours.append(_our_rate(module, splits, STEPS, WORK / "throughput"))
        print(f"  round {r + 1}: reference {ref[-1]:.1f} img/s, ours {ours[-1]:.1f} img/s", flush=True)
    return {"reference_images_per_s": [round(v, 1) for v in ref], "ours_images_per_s": [round(v, 1) for v in ours],
            "ratio_median": round(statistics.median(o / r for o, r in zip(ours, ref, strict=True)), 3),
            "steps": STEPS, "batch": BATCH, "workers": WORKERS}


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    model = model_file()
    out_json = RESULTS / f"bench_data{TAG}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if results.get("model") != model.name:
        results = {"model": model.name}
    cells = results.setdefault("memory", {})
    t0 = time.perf_counter()
    for n in SIZES:
        folder = write_folder(WORK / f"folder_{n}", n, size=IMAGE)
        pattern = write_shards(folder, WORK / f"shards_{n}", per_shard=1000)
        for kind, spec in (("folder", f"imagefolder:{folder}"), ("shards", f"webdataset:{pattern}")):
            name = f"{kind}_{n}"
            if name not in cells:
                print(f"{name}: compress {' '.join(BOUND)} ...", flush=True)
                cells[name] = memory_cell(spec, model, name)
                RESULTS.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(results, indent=1))
            print(f"{name}: peak {cells[name]['peak_pss_mib']} MiB, {cells[name]['seconds']} s", flush=True)
    growth = {kind: round(cells[f"{kind}_{SIZES[1]}"]["peak_pss_mib"] / cells[f"{kind}_{SIZES[0]}"]["peak_pss_mib"], 3)
              for kind in ("folder", "shards")}
    results["growth"] = growth
    if "throughput" not in results:
        print("throughput: reference ImageFolder loop vs ours ...", flush=True)
        results["throughput"] = throughput(WORK / f"folder_{SIZES[0]}")
    results["seconds_this_call"] = round(time.perf_counter() - t0, 1)
    out_json.write_text(json.dumps(results, indent=1))
    write_markdown(results, RESULTS / f"bench_data{TAG}.md")
    print((RESULTS / f"bench_data{TAG}.md").read_text())


def write_markdown(results: dict, path: Path) -> None:
    cells, tp = results["memory"], results["throughput"]
    lines = [f"# bench_data{TAG}: memory and throughput over image sets on disk ({results['model']}, 224x224)", "",
             f"Each cell: `force-compress compress {results['model']} --data SPEC {' '.join(BOUND)}` in a "
             "subprocess.", "",
             "| source | images | peak memory, run + workers (PSS, MiB) | epoch img/s | seconds | held |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for c in cells.values():
        lines.append(f"| {c['cell'].split('_')[0]} | {c['cell'].split('_')[1]} | {c['peak_pss_mib']} | "
                     f"{c['train_images_per_s']} | {c['seconds']} | {c['held']} |")
    lines += ["", "Peak at 20,000 ÷ peak at 2,000 (target ≤ 1.10): " + ", ".join(
        f"{k} {v:.3f}" for k, v in results["growth"].items()), "",
        f"Training loop vs torchvision ImageFolder + DataLoader ({tp['workers']} workers, batch {tp['batch']}, "
        f"{tp['steps']} steps a round): reference {tp['reference_images_per_s']} img/s, ours "
        f"{tp['ours_images_per_s']} img/s; median ratio **{tp['ratio_median']:.3f}** (target ≥ 0.9).", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
