"""What FORCE does on vision transformers (README "Vision transformers"): timm's ViT-Tiny and DeiT-Tiny (distilled,
two heads) and a hybrid (mobilevit_xxs), at random init with 10 classes, exported by the TorchScript exporter, then
compressed by the real CLI at 90/95/98% unstructured on digits with the default recipe (for an attention network:
AdamW, lr 1e-3, weight decay 0.05, cosine; FORCE masks) and no gate. Each row: held-out top-1 (onnxruntime, the
published file), the sparsity read back from the published file (pruned entries exactly 0.0), the effective
density (what still connects input to output). Writes benchmarks/results/bench_vit.md (and .json).

Digits are 8x8; ViT and DeiT run at 16x16 with patch 4 (16 tokens; ViT-Tiny's width and depth), MobileViT at
64x64; 5 epochs (`EPOCHS=10` for more)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "force-compress"
MODELS = {  # name: (timm model, create kwargs, input size)
    "ViT-Tiny": ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4}, 16),
    "DeiT-Tiny (distilled)": ("deit_tiny_distilled_patch16_224", {"img_size": 16, "patch_size": 4}, 16),
    "MobileViT-XXS (hybrid)": ("mobilevit_xxs", {}, 64),
}
SPARSITIES = (0.9, 0.95, 0.98)
EPOCHS = int(os.environ.get("EPOCHS", "5"))


def export(name: str, kwargs: dict, size: int, path: Path) -> None:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def main() -> int:
    rows, out = [], HERE / "results" / "bench_vit"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, (name, kwargs, size) in MODELS.items():
            src = work / f"{name}.onnx"
            export(name, kwargs, size, src)
            for sparsity in SPARSITIES:
                r = subprocess.run([str(EXE), "compress", str(src), "--sparsity", str(sparsity), "--epochs",
                                    str(EPOCHS), "--min-accuracy", "0", "--no-prefect", "--json", "--runs-dir",
                                    str(work / "runs"), "--registry", str(work / "reg"), "--name",
                                    f"{name}-{sparsity}".replace("_", "-").replace(".", "")],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if r.returncode not in (0, 1):
                    rows.append({"model": label, "sparsity": sparsity, "error": r.stderr.strip()[-300:]})
                    print(rows[-1], flush=True)
                    continue
                s = json.loads(r.stdout)
                report = json.loads((Path(s["run_dir"]) / "report.json").read_text())
                rows.append({"model": label, "timm": name, "sparsity": sparsity, "top1": s["top1"],
                             "file_sparsity": report["sparsity"]["sparsity"],
                             "effective_density": report["effective_density"], "recipe": s["recipe"],
                             "epochs": EPOCHS})
                print(json.dumps(rows[-1]), flush=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    table(rows, out)
    return 0


def table(rows: list[dict], out: Path) -> None:
    lines = ["| model | sparsity | held-out top-1 | sparsity in the file | effective density |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['sparsity']:.0%} | failed: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['top1']:.4f} | {r['file_sparsity']:.4f} | "
                         f"{r['effective_density']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
