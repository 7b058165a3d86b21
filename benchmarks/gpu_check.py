"""The CUDA path over data on disk, in one run of a few minutes (issue 23): resnet50 at 224x224 (initialization,
exported to ONNX here), a synthetic JPEG folder streamed by DataLoader workers, and on the GPU
1. FORCE masks at 90% (the pipeline's mask stage on CUDA),
2. one training epoch (the pipeline's loop: bf16 autocast, channels_last, pinned memory, non-blocking copies),
3. validation under onnxruntime's CUDA provider (batch by batch),
printing images/s for each and the GPU's utilisation sampled by nvidia-smi while it trains.

    python benchmarks/gpu_check.py            # 8,000 images (made once under runs/gpu_check/)
    IMAGES=2000 python benchmarks/gpu_check.py

Without a CUDA device it says so and exits 0 (nothing is run). Writes benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORK = ROOT / "runs" / "gpu_check"
IMAGES = int(os.environ.get("IMAGES", "8000"))
BATCH = 128


def _utilisation(stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
            samples.append(int(out.splitlines()[0]))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    from synthetic_images import write_folder
    from torchvision.models import resnet50

    from force_core import add_train_norm
    from pipeline.config import CompressConfig
    from pipeline.data import load_data, mask_batches
    from stages.compute_masks import compute_masks_stage
    from stages.import_onnx import import_onnx
    from stages.onnx_convert.mask_file import load_masks
    from stages.onnx_convert.scoring import onnx_accuracy
    from stages.onnx_convert.to_torch import load_module
    from stages.sparse_train.training import train_module

    t_all = time.perf_counter()
    folder = write_folder(WORK / f"folder_{IMAGES}", IMAGES, size=224)
    model = WORK / "resnet50_224.onnx"
    if not model.exists():
        torch.manual_seed(0)
        torch.onnx.export(resnet50(num_classes=10).eval(), (torch.zeros(1, 3, 224, 224),), str(model), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    run = WORK / "run"
    shutil.rmtree(run, ignore_errors=True)
    imported = import_onnx(model, run, train_norm=True)  # BatchNorm folded at export: trained with one
    splits = load_data(f"imagefolder:{folder}", (3, 224, 224), num_classes=10, memory_mb=0)
    figures = {"gpu": torch.cuda.get_device_name(0), "images": IMAGES, "held": splits.held}

    t = time.perf_counter()
    batches = mask_batches(splits, BATCH, 20, seed=0)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    masks = compute_masks_stage(imported.normalized_path, run / "masks.npz", method="force", density=0.1, steps=20,
                                batches=batches, device="cuda", train_norm=True)
    torch.cuda.synchronize()
    figures["masks"] = {"seconds": round(time.perf_counter() - t, 1), "read_seconds": round(read_s, 1),
                        "images_per_s": round(20 * BATCH / (time.perf_counter() - t), 1)}
    print(f"masks: FORCE 20 steps on cuda in {figures['masks']['seconds']} s", flush=True)

    module, param_map = load_module(imported.normalized_path)
    maskset = load_masks(masks.masks_path, param_map)
    norms = add_train_norm(module)
    config = CompressConfig(model=str(model), epochs=1, batch_size=BATCH, lr=0.1, recipe="scratch", device="cuda")
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_utilisation, args=(stop, samples), daemon=True)
    sampler.start()
    result = train_module(module, maskset, splits, config, run, progress=True, plot=False, train_norms=norms)
    stop.set()
    sampler.join()
    busy = [s for s in samples if s > 0] or [0]
    figures["train"] = {"images_per_s": round(result.images_per_s, 1), "seconds": round(result.seconds, 1),
                        "gpu_util_mean": round(statistics.mean(samples), 1) if samples else None,
                        "gpu_util_median_busy": statistics.median(busy), "samples": len(samples)}
    print(f"train: {result.images_per_s:.0f} img/s, GPU utilisation mean {figures['train']['gpu_util_mean']}%",
          flush=True)

    t = time.perf_counter()
    top1, _ = onnx_accuracy(model, splits.val, device="cuda")
    figures["validate"] = {"images_per_s": round(len(splits.val) / (time.perf_counter() - t), 1),
                           "images": len(splits.val), "top1_input": round(top1, 4)}
    figures["seconds"] = round(time.perf_counter() - t_all, 1)
    out = ROOT / "benchmarks" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
