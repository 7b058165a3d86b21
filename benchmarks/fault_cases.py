"""Bad inputs and faults a delivery pipeline meets, each run through the real `force-compress` CLI in a subprocess
with `--json`: its exit code, the JSON answer's `error`, the first line on stderr and what it left behind (run and
registry folders, staging folders). `make fault-cases` writes benchmarks/results/fault_cases.md (and .json).

Cases needing a real small or read-only file system mount a tmpfs (root and mount rights); without them they are
listed as skipped. Each case has the exit code it must give; the script exits 1 when any case differs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice, once per model

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "force-compress"
RESULTS = HERE / "results"
TINY = ["--sparsity", "0.9", "--epochs", "1", "--max-steps", "2", "--steps", "2", "--mask-batch-size", "64",
        "--batch-size", "64", "--min-accuracy", "0.0", "--no-prefect", "--json"]


@dataclass
class Case:
    name: str
    expect: int
    setup: Callable[[Path], list[str]]  # (work dir) -> CLI arguments after `force-compress`
    signal_when: tuple[str, int] | None = None  # (glob under the work dir, signal): sent once the glob matches
    needs_mount: bool = False
    rerun: bool = False  # the same command again in the same directory, reported instead


# --- inputs -------------------------------------------------------------------------------------------------


def _export(module, path: Path, shape=(1, 1, 8, 8), **kwargs) -> Path:
    import torch

    module.eval()
    names = {"input_names": ["input"], "output_names": ["logits"],
             "dynamic_axes": {"input": {0: "N"}, "logits": {0: "N"}}}
    torch.onnx.export(module, (torch.zeros(*shape),), str(path), dynamo=False, **{**names, **kwargs})
    return path


def _cnn(channels: int = 1, classes: int = 10, head=None):
    import torch.nn as nn

    layers = [nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
              nn.Linear(128, classes)]
    return nn.Sequential(*layers, *([head] if head is not None else []))


def tiny(d: Path, **kwargs) -> Path:
    import torch

    torch.manual_seed(0)
    return _export(_cnn(**kwargs), d / "tiny.onnx")


def rgb_tiny(d: Path) -> Path:
    import torch

    torch.manual_seed(0)
    return _export(_cnn(channels=3), d / "rgb.onnx", shape=(1, 3, 16, 16))


def big(d: Path) -> Path:
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    return _export(nn.Sequential(nn.Flatten(), nn.Linear(64, 100_000), nn.ReLU(), nn.Linear(100_000, 10)),
                   d / "big.onnx")


def folder(d: Path, classes: int = 10, per_class: int = 12, mode: str = "RGB", empty: tuple[str, ...] = (),
           corrupt: int = 0) -> Path:
    from PIL import Image

    sys.path.insert(0, str(HERE))
    from synthetic_images import image

    root = d / "images"
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            a = image(c, i, 16)
            if mode == "I;16":
                im = Image.fromarray(a.mean(2).astype(np.uint16) * 257)
            else:
                im = Image.fromarray(a).convert(mode)
            im.save(root / f"class{c:02d}" / f"{i}.png")
    for name in empty:
        (root / name).mkdir()
    for i in range(corrupt):
        (root / "class00" / f"{i}.png").write_bytes(b"not a png")
    return root


def npz(d: Path, x=None, y=None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((200, 8, 8), dtype=np.float32) if x is None else x
    y = np.arange(200) % 10 if y is None else y
    np.savez(d / "data.npz", x=x, y=y)
    return d / "data.npz"


def with_external_data(d: Path, missing: bool = False) -> Path:
    import onnx

    (d / "models").mkdir()
    path = d / "models" / "x.onnx"
    onnx.save(onnx.load(str(tiny(d))), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="x.onnx.data", size_threshold=0)
    if missing:
        (d / "models" / "x.onnx.data").unlink()
    return path


def edited(d: Path, edit: Callable) -> Path:
    import onnx

    model = onnx.load(str(tiny(d)))
    edit(model)
    path = d / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _nan_weight(model) -> None:
    from onnx import numpy_helper

    t = model.graph.initializer[0]
    a = numpy_helper.to_array(t).copy()
    a.flat[0] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))


def _opset(version: int):
    def edit(model) -> None:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = version
    return edit


def nhwc(d: Path) -> Path:
    import torch
    import torch.nn as nn

    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _cnn(channels=3)

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    torch.manual_seed(0)
    return _export(NHWC(), d / "nhwc.onnx", shape=(1, 16, 16, 3))


def dynamic_channels(d: Path) -> Path:
    import onnx

    path = rgb_tiny(d)
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    onnx.save(model, str(path))
    return path


def softmax_output(d: Path) -> Path:
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    return _export(_cnn(head=nn.Softmax(dim=1)), d / "softmax.onnx")


def two_outputs(d: Path) -> Path:
    import torch
    import torch.nn as nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _cnn()

        def forward(self, x):
            y = self.net(x)
            return y, y * 2

    torch.manual_seed(0)
    return _export(Two(), d / "two.onnx", output_names=["a", "b"], dynamic_axes={"input": {0: "N"}})


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                        str(path)], capture_output=True, text=True)
    if r.returncode:
        raise PermissionError(r.stderr.strip())
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _bomb(d: Path) -> list[str]:
    from PIL import Image

    root = folder(d)
    Image.new("L", (12_000, 12_000)).save(root / "class01" / "bomb.png")  # 144 M pixels: over PIL's 89 M limit
    return ["compress", str(tiny(d)), *TINY, "--data", f"imagefolder:{root}", "--max-bad-fraction", "0.01"]


# --- the cases ----------------------------------------------------------------------------------------------

def c(*args) -> Callable[[Path], list[str]]:
    """Setup building `force-compress compress MODEL TINY ARGS` with the tiny model."""
    return lambda d: ["compress", str(tiny(d)), *TINY, *args]


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def published(d: Path) -> Path:
    """A version published by force-compress (what predict takes)."""
    subprocess.run([str(EXE), "compress", str(tiny(d)), *TINY], cwd=d, capture_output=True, check=True)
    return d / "registry" / "tiny" / "v1"


def _registry_file(d: Path) -> list[str]:
    (d / "reg").write_text("a file")
    return ["compress", str(tiny(d)), *TINY, "--registry", str(d / "reg")]


def _fill_after(d: Path, disk: Path, when: str) -> None:
    """Fill `disk` once `when` exists under `d` (run in a thread beside the command)."""
    while not list(d.glob(when)):
        time.sleep(0.01)
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())


CASES = [
    Case("model file missing", 2, lambda d: ["compress", str(d / "nope.onnx"), *TINY]),
    Case("model file empty", 2, lambda d: ["compress", str(_file(d / "e.onnx", b"")), *TINY]),
    Case("model truncated to 600 bytes", 2,
         lambda d: ["compress", str(_file(d / "t.onnx", tiny(d).read_bytes()[:600])), *TINY]),
    Case("a PNG named .onnx", 2,
         lambda d: ["compress", str(_file(d / "p.onnx", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)), *TINY]),
    Case("model with two outputs", 2, lambda d: ["compress", str(two_outputs(d)), *TINY]),
    Case("external data file missing", 2, lambda d: ["compress", str(with_external_data(d, missing=True)), *TINY]),
    Case("external data, relative path from another directory", 0,
         lambda d: ["compress", os.path.relpath(with_external_data(d), d), *TINY]),  # models/x.onnx
    Case("channels-last (NHWC) input", 2, lambda d: ["compress", str(nhwc(d)), *TINY]),
    Case("dynamic channel axis", 2, lambda d: ["compress", str(dynamic_channels(d)), *TINY, "--image-size", "16",
                                               "16"]),
    Case("opset 30", 2, lambda d: ["compress", str(edited(d, _opset(30))), *TINY]),
    Case("NaN in a weight", 2, lambda d: ["compress", str(edited(d, _nan_weight)), *TINY]),
    Case("output already a softmax (warned, trained on log-probabilities)", 0,
         lambda d: ["compress", str(softmax_output(d)), *TINY]),
    Case("sparsity 1.5", 2, c("--sparsity", "1.5")),
    Case("sparsity not a number", 2, c("--sparsity", "abc")),
    Case("unknown method", 2, c("--method", "magic")),
    Case("unknown data scheme", 2, c("--data", "s3://bucket/x")),
    Case("image folder: an empty extra class folder", 2,
         lambda d: ["compress", str(rgb_tiny(d)), *TINY, "--data", f"imagefolder:{folder(d, empty=('zebra',))}"]),
    Case("image folder: one class only", 2,
         lambda d: ["compress", str(rgb_tiny(d)), *TINY, "--data", f"imagefolder:{folder(d, classes=1)}"]),
    Case("image folder: 11 classes, 10 outputs", 2,
         lambda d: ["compress", str(rgb_tiny(d)), *TINY, "--data", f"imagefolder:{folder(d, classes=11)}"]),
    Case("image folder: 16-bit greyscale PNGs (decoded, not white)", 0,
         lambda d: ["compress", str(tiny(d)), *TINY, "--data", f"imagefolder:{folder(d, mode='I;16')}"]),
    Case("image folder: 10% of the images corrupt", 2,
         lambda d: ["compress", str(rgb_tiny(d)), *TINY, "--data", f"imagefolder:{folder(d, corrupt=12)}"]),
    Case("image folder: a decompression bomb (skipped, named)", 0, _bomb),
    Case("npz: NaN pixels", 2, lambda d: ["compress", str(tiny(d)), *TINY, "--data",
                                          f"npz:{npz(d, x=np.full((200, 8, 8), np.nan, np.float32))}"]),
    Case("npz: string labels", 2, lambda d: ["compress", str(tiny(d)), *TINY, "--data",
                                             f"npz:{npz(d, y=np.array(['cat', 'dog'] * 100))}"]),
    Case("npz: every label the same class", 2, lambda d: ["compress", str(tiny(d)), *TINY, "--data",
                                                          f"npz:{npz(d, y=np.zeros(200, int))}"]),
    Case("npz: labels 0.5, 1.5, ...", 2, lambda d: ["compress", str(tiny(d)), *TINY, "--data",
                                                    f"npz:{npz(d, y=np.arange(200) % 10 + 0.5)}"]),
    Case("registry path is a file", 2, _registry_file),
    Case("registry name longer than the file system allows", 3, lambda d: ["compress", str(tiny(d)), *TINY,
                                                                           "--registry", str(d / ("r" * 300))]),
    Case("registry on a read-only file system", 3, lambda d: ["compress", str(tiny(d)), *TINY, "--registry",
                                                              str(d / "ro" / "reg")], needs_mount=True),
    Case("registry disk smaller than the model needs", 3, lambda d: ["compress", str(big(d)), *TINY, "--registry",
                                                                     str(d / "small" / "reg")], needs_mount=True),
    Case("registry disk fills up during the run", 3, lambda d: ["compress", str(tiny(d)), *TINY, "--registry",
                                                                str(d / "disk" / "reg")], needs_mount=True),
    Case("--device cuda on a machine without CUDA", 3, c("--device", "cuda")),
    Case("--nproc 0", 2, c("--nproc", "0")),
    Case("gate: --min-accuracy 1.0", 1, c("--min-accuracy", "1.0")),
    Case("training diverges (--lr 1e6)", 1, c("--lr", "1e6", "--epochs", "2", "--max-steps", "10")),
    Case("SIGINT (Ctrl-C) during training", 130, c("--epochs", "50"),
         signal_when=("runs/*/history.json", signal.SIGINT)),
    Case("SIGTERM during training, through the Prefect flow", 143,
         lambda d: ["compress", str(tiny(d)), *[a for a in TINY if a != "--no-prefect"], "--epochs", "50"],
         signal_when=("runs/*/history.json", signal.SIGTERM)),
    Case("SIGTERM during publish", 143, lambda d: ["compress", str(big(d)), *TINY],
         signal_when=("registry/*/.staging-*/model.onnx", signal.SIGTERM)),
    Case("SIGKILL during publish, then the same command again", 0, lambda d: ["compress", str(big(d)), *TINY],
         signal_when=("registry/*/.staging-*/model.onnx", signal.SIGKILL), rerun=True),
    Case("predict: an image that does not exist", 2, lambda d: ["predict", str(published(d)), str(d / "nope.png"),
                                                                "--json"]),
    Case("sweep: --sparsities empty", 2, lambda d: ["sweep", str(tiny(d)), "--sparsities", "", "--no-prefect",
                                                    "--json"]),
]


# --- running ------------------------------------------------------------------------------------------------

def _left_behind(d: Path) -> str:
    runs = sorted(p.name for p in (d / "runs").glob("*") if p.name != "splits") if (d / "runs").is_dir() else []
    splits = list((d / "runs" / "splits").glob("*.json"))
    regs = [p for p in d.rglob("*") if p.name.startswith(".staging-")]
    versions = sorted(str(p.relative_to(d)) for p in d.rglob("v[0-9]*") if (p / "manifest.json").is_file())
    parts = [f"{len(runs)} run dir" + ("s" if len(runs) != 1 else "")] if runs else []
    parts += [f"version {', '.join(versions)}"] if versions else []
    parts += [f"{len(regs)} staging entries"] if regs else []
    parts += [f"{len(splits)} split file"] if splits else []
    return "; ".join(parts) or "nothing"


def _run(case: Case, d: Path, args: list[str]) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([str(EXE), *args], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if case.signal_when:
        pattern, sig = case.signal_when
        while p.poll() is None:
            if list(d.glob(pattern)):
                p.send_signal(sig)
                break
            time.sleep(0.0005)
    out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def run_case(case: Case, base: Path) -> dict:
    d = base / case.name.replace(" ", "_").replace("/", "_")[:60]
    d.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if case.needs_mount:
            try:
                if "read-only" in case.name:
                    stack.enter_context(tmpfs(d / "ro", "1m", read_only=True))
                elif "smaller" in case.name:
                    stack.enter_context(tmpfs(d / "small", "20m"))
                else:
                    disk = stack.enter_context(tmpfs(d / "disk", "40m"))
                    import threading

                    threading.Thread(target=_fill_after, args=(d, disk, "runs/*/model.sparse.onnx"),
                                     daemon=True).start()
            except PermissionError as e:
                return {"case": case.name, "expect": case.expect, "skipped": f"no tmpfs: {e}"}
        args = case.setup(d)
        t = time.perf_counter()
        code, out, err = _run(case, d, args)
        if case.rerun:
            code, out, err = _run(Case(case.name, case.expect, case.setup), d, args)
        seconds = time.perf_counter() - t
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("error:", "interrupted", "internal error", "warning:"))]
        try:
            answer = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        except (ValueError, IndexError):
            answer = None
        answer = answer[0] if isinstance(answer, list) and answer else answer  # predict answers a list
        if code == 0 and isinstance(answer, dict):  # published: its message, and any image it skipped
            bad = (answer.get("data") or {}).get("unreadable") or {}
            skipped = [f"skipped {bad['unreadable']} unreadable: " + ", ".join(
                f"{b['image']} ({b.get('error', '')[:60]})" for b in bad["first"])] if bad.get("unreadable") else []
            errors = [ln for ln in errors if ln.startswith("warning:")] + [answer["message"], *skipped]
        elif not errors and isinstance(answer, dict):  # with --json a failed gate prints its lines in the answer
            errors = [f"(--json message) {answer.get('message', '')}"]
        left = _left_behind(d)
    return {"case": case.name, "expect": case.expect, "exit": code, "ok": code == case.expect,
            "json": (answer or {}).get("error", "-") if isinstance(answer, dict) else ("none" if answer is None
                                                                                      else "list"),
            "json_exit": (answer or {}).get("exit_code") if isinstance(answer, dict) else None,
            "line": _first_line(code, errors, lines), "traceback": "Traceback" in err, "left": left,
            "seconds": round(seconds, 1)}


def _first_line(code: int, errors: list[str], lines: list[str]) -> str:
    return "; ".join(errors[:2])[:240] if code == 0 else (errors or lines or [""])[0][:240]


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fc-faults-") as tmp:
        for i, case in enumerate(CASES, 1):
            row = run_case(case, Path(tmp))
            rows.append(row)
            status = "skipped" if "skipped" in row else ("ok" if row["ok"] else f"WRONG (expected {case.expect})")
            print(f"{i:2d}. {case.name}: exit {row.get('exit')} {status}  {row.get('line', row.get('skipped'))}",
                  flush=True)
    (RESULTS / "fault_cases.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = ["| # | case | expected | exit | `--json` error | first line on stderr | traceback | left behind |",
          "| ---: | --- | ---: | ---: | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        if "skipped" in r:
            md.append(f"| {i} | {r['case']} | {r['expect']} | skipped | | {r['skipped']} | | |")
            continue
        line = r["line"].replace("|", "\\|")
        md.append(f"| {i} | {r['case']} | {r['expect']} | {r['exit']}{'' if r['ok'] else ' ✗'} | {r['json']} | "
                  f"{line} | {'yes' if r['traceback'] else 'no'} | {r['left']} |")
    wrong = [r for r in rows if "skipped" not in r and (not r["ok"] or r["json_exit"] != r["exit"])]
    md.append("")
    md.append(f"{len(rows)} cases, {sum('skipped' in r for r in rows)} skipped, {len(wrong)} not as expected.")
    (RESULTS / "fault_cases.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
