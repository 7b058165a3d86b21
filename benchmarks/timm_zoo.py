"""Every timm family as users bring it: the smallest model of each family (enumerated from timm: each module, and the
families that share a module by name), at random init with 10 classes, exported three ways (TorchScript in eval mode
with BatchNorm folded, the dynamo exporter, the TorchScript file simplified by onnxslim), and each file compressed by
the real `force-compress` CLI in a subprocess: FORCE, 90% unstructured, 1 epoch of 2 steps on digits, no gate. FORCE
runs 2 steps to keep the run short; where masks of 2 steps cut the network, the case is run again at the method's
default steps (what a user runs), and the table says so.

An outcome is the CLI's exit code: 0 (published), 2 (refused with one line: counted as served honestly, not as
compressed), 4 (an internal error: the failure the issue forbids), a timeout, or "no file" where the exporter itself
fails (torch's, not ours: left out of that form's count). `make timm-zoo` writes benchmarks/results/timm_zoo.json
and timm_zoo.md; `--only a,b` runs some families, `--forms` some forms, `--list` prints the selection.

The selection is by parameter count, counted on the meta device (nothing allocated): the families' smallest members
keep a run of every family under an hour on two cores."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXE = Path(sys.executable).parent / "force-compress"
FORMS = ("torchscript", "dynamo", "onnxslim")
CHANNEL = "channel"  # the channel cut at 50% of the TorchScript file: the coverage column, CNN families only
# families with no attention that are not convolutional networks either (token-mixing MLPs, an LSTM)
NOT_CNN = ("mixer", "resmlp", "mlp_mixer", "sequencer")
SIZE = 64
CASE_TIMEOUT_S = 1800  # per step of a case (export, each compress attempt): halonet_h1 (dynamo, 256²) ~15 min
ONE_CORE = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # --jobs cases share the cores
SKIP_PREFIXES = ("tf_", "gluon_", "legacy_", "ig_", "ssl_", "swsl_", "test_", "inception_v3_tv")
# families that share a timm module, by model-name pattern: each is a family users name on its own
NAMED = {  # module: {family: model-name pattern}
    "efficientnet": {"efficientnet": "efficientnet_b*", "efficientnetv2": "efficientnetv2_*", "mixnet": "mixnet_*",
                     "mnasnet": "mnasnet_*", "fbnetc": "fbnetc_*", "tinynet": "tinynet_*",
                     "mobilenetv2": "mobilenetv2_*", "spnasnet": "spnasnet_*", "mobilenetv1": "mobilenetv1_*"},
    "mobilenetv3": {"lcnet": "lcnet_*", "fbnetv3": "fbnetv3_*", "mobilenetv4": "mobilenetv4_conv_*"},
    "resnet": {"resnet-d": "resnet[0-9]*d", "resnext": "resnext*", "seresnet": "seresnet[0-9]*",
               "ecaresnet": "ecaresnet*", "wide_resnet": "wide_resnet*"},
    "byobnet": {"repvgg": "repvgg_*", "mobileone": "mobileone_*", "gernet": "gernet_*", "resnext-ts": "resnext26ts",
                "regnetz": "regnetz_*"},
    "regnet": {"regnetx": "regnetx_*", "regnety": "regnety_*"},
    "cspnet": {"cspresnet": "cspresnet*", "cspdarknet": "cspdarknet*", "darknet": "darknet*"},
    "metaformer": {"poolformer": "poolformer_*", "convformer": "convformer_*", "caformer": "caformer_*"},
    "mlp_mixer": {"mixer": "mixer_*", "resmlp": "resmlp_*"},
    "maxxvit": {"coatnet": "coatnet_*", "maxvit": "maxvit_*"},
}
# vision towers of multimodal language models (hundreds of millions of weights, no classifier users compress here)
NOT_CLASSIFIERS = ("deepseek_vit", "gemma4_vit", "qwen3_vit")
CLI = ["--sparsity", "0.9", "--method", "force", "--epochs", "1", "--max-steps", "2", "--steps", "2",
       "--mask-batch-size", "32", "--batch-size", "32", "--min-accuracy", "0", "--val-images", "64", "--no-prefect",
       "--json"]
# blocks of 8, as the recorded column was cut: the column measures the surgery's coverage, not the runtime's block
CHANNEL_CLI = [*CLI[2:], "--sparsity", "0.5", "--structure", "channel", "--budget", "params", "--channel-multiple", "8"]


def _params_on_meta(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=10)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a model timm cannot build on meta is not a candidate
        return None


def families() -> dict[str, tuple[str, int]]:
    """{family: (its smallest model, parameters)}: each timm module's smallest model, and each NAMED family's."""
    import timm

    chosen = {}
    for module in timm.list_modules():
        if module in NOT_CLASSIFIERS:
            continue
        names = [n for n in timm.list_models(module=module) if not n.startswith(SKIP_PREFIXES)]
        groups = {module: names}
        for family, pattern in NAMED.get(module, {}).items():
            groups[family] = fnmatch.filter(names, pattern)
        for family, members in groups.items():
            sized = [(p, n) for n in members if (p := _params_on_meta(n))]
            if sized:
                p, n = min(sized)
                if n not in {m for m, _ in chosen.values()}:
                    chosen[family] = (n, p)
    return chosen


# ------------------------------------------------------------------------------------------------------ one case


def _build(name: str):
    """The model at random init with 10 classes, and the input size it runs at."""
    import timm
    import torch

    torch.manual_seed(0)
    # at SIZE where it runs there, else the smallest of 96 and 128 (inception's stem needs 75), else its own
    for kwargs, size in (({"img_size": SIZE}, SIZE), ({}, SIZE), ({}, 96), ({}, 128), ({}, None)):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            size = size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
            with torch.no_grad():
                out = model(torch.zeros(1, 3, size, size))
            if tuple(out.shape) == (1, 10):
                return model, size
        except Exception:  # noqa: BLE001 - the next way of building it
            continue
    raise RuntimeError(f"{name} builds at neither {SIZE} nor its own input size with 10 outputs")


def export(name: str, form: str, path: Path) -> int:
    import onnx
    import torch

    model, size = _build(name)
    x = (torch.zeros(2, 3, size, size),)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    if form == "dynamo":
        batch = torch.export.Dim("N", min=1, max=1024)
        torch.onnx.export(model, x, str(path), dynamo=True, dynamic_shapes=({0: batch},), **names)
    else:
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **names)
        if form == "onnxslim":
            import onnxslim

            onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    return size


def run_case(name: str, form: str, work: Path) -> dict:
    model = work / f"{name}.{form}.onnx"
    t0 = time.time()
    exporter = "torchscript" if form == CHANNEL else form
    try:
        r = subprocess.run([sys.executable, __file__, "--export", name, exporter, str(model)], capture_output=True,
                           text=True, timeout=CASE_TIMEOUT_S, env=ONE_CORE)
    except subprocess.TimeoutExpired:
        return {"outcome": "no file", "why": f"the export ran past {CASE_TIMEOUT_S} s", "seconds": CASE_TIMEOUT_S}
    if r.returncode != 0:
        return {"outcome": "no file", "why": _exception_line(r.stderr), "seconds": round(time.time() - t0, 1)}
    size = int(r.stdout.strip().splitlines()[-1])
    t1 = time.time()
    args = [str(EXE), "compress", str(model), "--data", "digits", "--runs-dir", str(work / "runs"), "--registry",
            str(work / "registry"), "--name", f"{name}-{form}".replace("_", "-"),
            *(CHANNEL_CLI if form == CHANNEL else CLI)]
    retried = None
    for attempt in (args, _default_steps(args)):
        try:
            r = subprocess.run(attempt, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=work,
                               env=ONE_CORE)
        except subprocess.TimeoutExpired:
            return {"outcome": "timeout", "size": size, "seconds": CASE_TIMEOUT_S}
        try:
            summary = json.loads(r.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            summary = {}
        # 2 FORCE steps are this benchmark's shortcut, not what a user runs: masks that cut the network there are
        # made again at the method's default steps, and the record says so
        if r.returncode != 1 or "the masks cut the network" not in str(summary.get("message")) or retried:
            break
        retried = str(summary.get("message"))[:240]
    # exit 1 with no gate (--min-accuracy 0): the masks cut the network, training diverged, or parity failed
    outcome = {0: "compressed", 1: "stopped", 2: "refused"}.get(r.returncode, f"exit {r.returncode}")
    record = {"outcome": outcome, "exit_code": r.returncode, "size": size, "seconds": round(time.time() - t1, 1)}
    if retried:
        record["steps"], record["at_2_steps"] = "default", retried
    if form == CHANNEL:
        import onnx

        from stages.onnx_convert.model_checks import has_attention

        record["attention"] = has_attention(onnx.load(str(model), load_external_data=False))
    if r.returncode == 0:
        record["sparsity"] = summary.get("sparsity")
        if form == CHANNEL:
            costs = summary.get("costs") or {}
            before, after = costs.get("input") or {}, costs.get("exported") or {}
            record["params_ratio"] = after.get("params", 0) / max(before.get("params", 1), 1)
            record["macs_ratio"] = after.get("macs", 0) / max(before.get("macs", 1), 1)
            record["latency_ratio_b1"] = ((summary.get("latency_ms") or {}).get("ratio") or {}).get("median")
    else:
        record["why"] = (summary.get("message") or (r.stderr.strip().splitlines() or ["?"])[-1])[:240]
    return record


def _default_steps(args: list[str]) -> list[str]:
    i = args.index("--steps")
    return args[:i] + args[i + 2:]


def _exception_line(stderr: str) -> str:
    """The exporter's own complaint: the last line that names an exception, else the last line."""
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", stderr)  # the dynamo exporter colours its messages
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()] or ["?"]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Unsupported\w*):", ln)]
    return (named or lines)[-1][:200]


# ------------------------------------------------------------------------------------------------------- table


def table(results: dict) -> str:
    rows = ["| family | model | params | input | " + " | ".join(FORMS) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in FORMS) + " |"]
    for family, r in results.items():
        cells = []
        for form in FORMS:
            c = r["forms"].get(form)
            steps = " (default steps; 2 cut the network)" if c is not None and c.get("steps") == "default" else ""
            cells.append("" if c is None else c["outcome"] + steps + (f": {c['why'][:90]}" if c.get("why") else ""))
        size = next((c["size"] for c in r["forms"].values() if c.get("size")), "")
        rows.append(f"| {family} | {r['model']} | {r['params'] / 1e6:.2f}M | {size} | " + " | ".join(cells) + " |")
    counts = []
    for form in FORMS:
        cases = [r["forms"][form] for r in results.values() if form in r["forms"]]
        if not cases:
            continue
        made = [c for c in cases if c["outcome"] != "no file"]
        ok = sum(c["outcome"] == "compressed" for c in made)
        refused = sum(c["outcome"] == "refused" for c in made)
        stopped = sum(c["outcome"] == "stopped" for c in made)
        internal = len(made) - ok - refused - stopped
        counts.append(f"{form}: {ok}/{len(made)} compressed ({ok / max(len(made), 1):.1%}), {refused} refused "
                      f"(exit 2), {stopped} stopped (exit 1), {internal} internal error, killed or timed out, "
                      f"{len(cases) - len(made)} not exported by torch")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {c}" for c in counts) + "\n" + coverage(results)


def coverage(results: dict) -> str:
    """The channel column: for each convolutional family (no attention, not an MLP), cut at 50% or why not, with
    what the cut model costs against the input (parameters, MACs per image, onnxruntime latency at batch 1)."""
    cnn = {f: r["forms"][CHANNEL] for f, r in results.items()
           if CHANNEL in r["forms"] and r["forms"][CHANNEL]["outcome"] != "no file"
           and not r["forms"][CHANNEL].get("attention") and f not in NOT_CNN}
    if not cnn:
        return ""
    rows = ["", "Channel cut, 50% of the weights (FORCE, `--structure channel --budget params --channel-multiple 8`), "
            "CNN families:", "",
            "| family | model | outcome | params | MACs | latency, batch 1 |", "| --- | --- | --- | --- | --- | --- |"]
    for family, c in cnn.items():
        ratios = [f"{c[k]:.2f}x" if c.get(k) is not None else "" for k in ("params_ratio", "macs_ratio",
                                                                            "latency_ratio_b1")]
        outcome = "cut" if c["outcome"] == "compressed" else f"{c['outcome']}: {c.get('why', '')[:120]}"
        rows.append(f"| {family} | {results[family]['model']} | {outcome} | " + " | ".join(ratios) + " |")
    cut = sum(c["outcome"] == "compressed" for c in cnn.values())
    rows += ["", f"- channel: {cut}/{len(cnn)} convolutional families cut ({cut / len(cnn):.1%})"]
    return "\n".join(rows) + "\n"


def main() -> int:
    global CASE_TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="families to run, comma-separated (default: all)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--list", action="store_true", help="print the selection and stop")
    ap.add_argument("--export", nargs=3, metavar=("MODEL", "FORM", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "timm_zoo"))
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="cases at once (one core each)")
    ap.add_argument("--case-timeout", type=int, default=CASE_TIMEOUT_S, help="seconds per step of a case")
    a = ap.parse_args()
    CASE_TIMEOUT_S = a.case_timeout
    if a.export:
        print(export(a.export[0], a.export[1], Path(a.export[2])))
        return 0
    chosen = families()
    if a.only:
        chosen = {k: v for k, v in chosen.items() if k in a.only.split(",") or v[0] in a.only.split(",")}
    if a.list:
        for family, (name, p) in chosen.items():
            print(f"{family:24s} {name:40s} {p / 1e6:8.2f}M")
        return 0
    out = Path(a.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for family, (name, p) in chosen.items():
        results.setdefault(family, {"model": name, "params": p, "forms": {}})
    lock = threading.Lock()

    def one(family: str, form: str) -> None:
        name = results[family]["model"]
        with tempfile.TemporaryDirectory() as tmp:
            record = run_case(name, form, Path(tmp))
        with lock:
            results[family]["forms"][form] = record
            print(f"{family:22s} {name:32s} {form:12s} {json.dumps(record)}", flush=True)
            out.with_suffix(".json").write_text(json.dumps(results, indent=1))  # a run cut short keeps what it did

    # every family's first form before any family's second: a run cut short has whole columns
    cases = [(family, form) for form in a.forms.split(",") for family in chosen]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda c: one(*c), cases))
    out.with_suffix(".md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
