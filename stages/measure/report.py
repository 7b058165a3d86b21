"""The validation report: the record (`report.json`), its markdown (`report.md`), its plot (`report.png`) and the
per-layer table. Written by the validate stage, read by publish and the flow's artifacts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import atomic_path
from pipeline.plotting import drawn_alone
from stages.measure.forms import FORM_LABELS, by_role
from stages.measure.gate import GateCheck
from stages.measure.latency import ratio_of
from stages.onnx_convert.sparsity import FileSparsity, LayerSparsity

ORT_DENSE_SPEED = (
    "onnxruntime multiplies unstructured zeros like any other value, so the pruned model runs at dense "
    "speed: what this sparsity buys today is the file size (gzipped or with sparse initializers) at the "
    "accuracy shown, not lower latency."
)


@dataclass(frozen=True)
class ValidationReport:
    """What `validate` measured; `to_dict()` is report.json. Small enough to pass between Prefect tasks."""

    exported_path: str
    report_json: str
    report_md: str
    report_png: str
    provider: str
    n_val: int
    top1: float
    top5: float
    target_sparsity: float
    sparsity: FileSparsity
    parity_max_abs: float
    parity_max_rel: float
    latency_ms: dict  # {"input": {"p50": .., "p90": ..}, "exported": {...}}, batch of one
    sizes: dict  # bytes: input, exported, dense, dense_gzip, sparse_initializers, sparse_initializers_gzip
    checks: tuple[GateCheck, ...]
    baseline_accuracy: float | None = None
    effective_density: float | None = None  # from the masks' sidecar: kept weights on an input→output path / all
    cut_layers: tuple[str, ...] = ()  # initializers with no kept weight on any path (masks.json)
    train_norm_layers: tuple[str, ...] = ()  # weights that trained with a train-time BatchNorm (masks.json)
    collapse_step: int | None = None  # FORCE's pruning step that found the network collapsed (masks.json)
    structure: str = "unstructured"
    costs: dict = dataclasses.field(default_factory=dict)  # {"input"|"exported": Costs.to_dict()}
    channels: dict = dataclasses.field(default_factory=dict)  # channel cut: kept/total channels, blocked nodes
    forms: tuple[dict, ...] = ()  # every form measured (stages.measure.forms): input, fp32, compact, int8, ...
    int8: dict = dataclasses.field(default_factory=dict)  # the quantize stage's notes: FP32 nodes, CPU features
    data: dict = dataclasses.field(default_factory=dict)  # pipeline.data.data_record: source, split, bounds, bad files

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[str, ...]:
        return tuple(c.message for c in self.checks if not c.passed)

    def describe(self) -> str:
        verdict = "gate passed" if self.passed else "gate FAILED: " + "; ".join(self.failures)
        before, after = ((self.costs.get(k) or {}).get("weight_macs") for k in ("input", "exported"))
        macs = f", MACs {after / before:.3f}x the input's" if self.structure == "channel" and before else ""
        return f"top-1 {self.top1:.4f}, sparsity {self.sparsity.sparsity:.4f}{macs} on {self.provider}; {verdict}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sparsity"].update(sparsity=self.sparsity.sparsity, params_sparsity=self.sparsity.params_sparsity)
        for layer, obj in zip(d["sparsity"]["layers"], self.sparsity.layers, strict=True):
            layer["density"] = obj.density
        d.update(passed=self.passed, failures=list(self.failures))
        return d


def load_report(path: str | Path) -> ValidationReport:
    """Rebuild a ValidationReport from report.json."""
    d = json.loads(Path(path).read_text())
    d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(ValidationReport)}}
    s = d["sparsity"]
    layers = tuple(
        LayerSparsity(l["name"], l["op"], tuple(l["shape"]), l["numel"], l["zeros"]) for l in s["layers"]
    )
    d["sparsity"] = FileSparsity(layers, s["prunable_total"], s["prunable_zeros"], s["params_total"], s["params_zeros"])
    d["checks"] = tuple(GateCheck(**c) for c in d["checks"])
    d["cut_layers"] = tuple(d.get("cut_layers", ()))
    d["train_norm_layers"] = tuple(d.get("train_norm_layers", ()))
    d["forms"] = tuple(d.get("forms", ()))
    return ValidationReport(**d)


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.3f} MB"


def _capped(report: ValidationReport) -> str:
    total = report.data.get("val_total")
    return f" of {total}, --val-images" if total else ""


def _data_rows(report: ValidationReport) -> list[str]:
    d = report.data
    if not d:
        return []
    rows = [f"| data | {d.get('source', '')}; {d.get('held', '')} |"]
    if d.get("max_steps"):
        rows.append(f"| training bounded by | --max-steps {d['max_steps']} |")
    bad = d.get("unreadable") or {}
    if bad.get("unreadable"):
        names = ", ".join(f"`{b['image']}`" for b in bad["first"])
        rows.append(f"| unreadable images skipped | {bad['unreadable']} of {bad['images']}: {names}"
                    f"{' …' if bad['unreadable'] > len(bad['first']) else ''} |")
    return rows


def render_markdown(report: ValidationReport, config) -> str:
    s, lat = report.sparsity, report.latency_ms
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# force-compress report: {config.model_name}",
        "",
        f"**Gate: {verdict}** — {config.method} at sparsity {config.sparsity:g}, onnxruntime on {report.provider}.",
        "",
    ]
    lines += [f"- {'✅' if c.passed else '❌'} {c.message}" for c in report.checks]
    lines += [
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| top-1 / top-5 (held-out, {report.n_val} images{_capped(report)}) | {report.top1:.4f} / "
        f"{report.top5:.4f} |",
        *_data_rows(report),
        f"| sparsity of prunable weights | {s.sparsity:.4f} ({s.prunable_zeros:,} of {s.prunable_total:,} "
        f"{'removed or zero' if report.structure == 'channel' else 'zero'}) |",
        f"| sparsity of all parameters | {s.params_sparsity:.4f} ({s.params_zeros:,} of {s.params_total:,} zero) |",
        *_mask_rows(report),
        f"| torch ↔ onnxruntime max abs / rel difference | {report.parity_max_abs:.2e} / {report.parity_max_rel:.2e} |",
        "",
        "## What each form buys",
        "",
        *_forms_table(report),
        "",
        _costs_line(report) + _sparse_note(report),
        "",
        _latency_line(lat),
        *_int8_lines(report),
        "",
        *([ORT_DENSE_SPEED, ""] if report.structure == "unstructured" else []),
        "## Per-layer density",
        "",
        "| initializer | op | shape | kept | density |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{l.name}` | {l.op} | {'×'.join(map(str, l.shape))} | {l.numel - l.zeros:,} / {l.numel:,} "
        f"| {l.density:.4f} |"
        for l in s.layers
    ]
    return "\n".join(lines) + "\n"


def _forms_table(report: ValidationReport) -> list[str]:
    rows = ["| form | file | size | gzip | top-1 | batch 1 p50 / p90 | batch 32 p50 / p90 | ÷ input, batch 32 "
            "| OpenVINO |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in report.forms:
        b1, b32 = f["latency_ms"]["1"], f["latency_ms"]["32"]
        ratio = b32.get("ratio")
        rows.append(f"| {FORM_LABELS[f['role']]} | `{f['file']}` | {_mb(f['size'])} | {_mb(f['gzip_size'])} "
                    f"| {f['top1']:.4f} | {b1['p50']:.3f} / {b1['p90']:.3f} ms "
                    f"| {b32['p50']:.2f} / {b32['p90']:.2f} ms "
                    f"| {'–' if ratio is None else format(ratio['median'], '.3f')} | {_openvino_cell(f)} |")
    return rows


def _openvino_cell(form: dict) -> str:
    ov = form.get("openvino")
    if ov is None:
        return "–"  # the input: the user's own file
    if ov.get("reads") and ov.get("same_top1"):
        return f"top-1 {ov['top1']:.4f}"
    return f"**onnxruntime only**: {ov['why']}" if form.get("onnxruntime_only") else f"not checked ({ov['why']})"


def _sparse_note(report: ValidationReport) -> str:
    if any(f["role"] == "compact" for f in report.forms):
        return ""
    z = report.sizes
    return (f" With sparse initializers the exported file would take {_mb(z['sparse_initializers'])} "
            f"({_mb(z['sparse_initializers_gzip'])} gzipped); no compact form was published beside it.")


def _costs_line(report: ValidationReport) -> str:
    before, after = report.costs.get("input"), report.costs.get("exported")
    if not before or not after:
        return ""
    return (f"Parameters {before['params']:,} → {after['params']:,} ({after['nonzero_params']:,} non-zero); "
            f"MACs per image {before['macs'] / 1e6:,.1f} M → {after['macs'] / 1e6:,.1f} M.")


def _int8_lines(report: ValidationReport) -> list[str]:
    roles = by_role(report.forms)
    if "int8" not in roles:
        return []
    fp32, int8, info = roles["fp32"], roles["int8"], report.int8
    r = ratio_of(int8["latency_ms"]["32"]["times"], fp32["latency_ms"]["32"]["times"])
    cpu = info.get("cpu_features", {})
    vnni = [k for k in ("avx512_vnni", "avx_vnni", "amx_int8") if cpu.get(k)]
    kernels = (f"this CPU reports {', '.join(vnni)} (INT8 dot-product instructions)" if vnni else
               "this CPU reports no VNNI/AMX: INT8 kernels multiply without dot-product instructions"
               if cpu.get("known") else "this CPU's INT8 features are unknown")
    speed = (f"INT8 ÷ FP32 at batch 32: median {r['median']:.3f} (p10–p90 {r['p10']:.3f}–{r['p90']:.3f}): "
             f"**{r['verdict']}**" + ("" if r["median"] < 1 and r["p90"] < 1 else
                                      "; this CPU gives no INT8 speed-up on this model"))
    lines = ["", f"{speed}; {kernels}; weights {'7-bit (reduce_range)' if info.get('reduce_range') else '8-bit'}, "
                 f"calibrated on {info.get('calibration_images', '?')} training images. "
                 f"INT8 with sparse initializers: {info.get('int8_sparse_initializers', 'not tried')}."]
    fp32_nodes = info.get("fp32_nodes") or []
    if fp32_nodes:
        more = f" and {len(fp32_nodes) - 10} more" if len(fp32_nodes) > 10 else ""
        lines += ["", f"Left in FP32 by the quantizer ({len(fp32_nodes)} nodes): "
                      + ", ".join(f"`{n}`" for n in fp32_nodes[:10]) + more + "."]
    return lines


def _latency_line(lat: dict) -> str:
    r = lat.get("ratio")
    if not r:
        return ""
    return (f"Latency exported ÷ input, {lat['input']['runs']} interleaved runs each at batch {r['batch']}: median "
            f"{r['median']:.3f} (p10–p90 {r['p10']:.3f}–{r['p90']:.3f}): **{r['verdict']}**.")


def _mask_rows(report: ValidationReport) -> list[str]:
    rows = []
    if report.structure == "channel":
        ch = report.channels
        if "channels_kept" in ch:
            rows.append(f"| channels kept (channel structure, graph cut) | {ch['channels_kept']:,} of "
                        f"{ch['channels_total']:,} prunable channels |")
        blocked = ch.get("blocked") or []
        if blocked:
            more = f" and {len(blocked) - 5} more" if len(blocked) > 5 else ""
            rows.append(f"| channels never pruned (operators the analysis keeps whole) | {len(blocked)}: "
                        + "; ".join(f"`{b}`" for b in blocked[:5]) + f"{more} |")
    if report.effective_density is not None:
        cut = ", ".join(f"`{n}`" for n in report.cut_layers) or "none"
        rows += [f"| effective density (kept weights on an input→output path, of all prunable) "
                 f"| {report.effective_density:.4f} |", f"| layers with no kept weight on a path | {cut} |"]
    if report.train_norm_layers:
        names = ", ".join(f"`{n}`" for n in report.train_norm_layers[:8])
        more = f" and {len(report.train_norm_layers) - 8} more" if len(report.train_norm_layers) > 8 else ""
        rows.append(f"| train-time BatchNorm (BatchNorm-fused layers; folded back at export) "
                    f"| {len(report.train_norm_layers)} layers: {names}{more} |")
    if report.collapse_step is not None:
        rows.append(f"| FORCE collapse guard | the network was nearly cut at pruning step {report.collapse_step}: "
                    f"nested selection from the mask before it |")
    return rows


def layer_table(report: ValidationReport) -> list[dict]:
    """Per-layer rows (for a Prefect table artifact or a CSV)."""
    return [
        {"initializer": l.name, "op": l.op, "shape": "x".join(map(str, l.shape)), "numel": l.numel,
         "kept": l.numel - l.zeros, "density": round(l.density, 6)}
        for l in report.sparsity.layers
    ]


def read_history(path) -> list[dict]:
    """Per-epoch records from the training stage's history file: a list of dicts, or a dict holding one."""
    if path is None or not Path(path).exists():
        return []
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)), [])
    return [r for r in data if isinstance(r, dict)]


@drawn_alone
def write_plot(report: ValidationReport, history: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.sparsity.layers
    ncols = 2 if history else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, max(3.0, 0.22 * len(layers) + 1.2)), squeeze=False)
    ax = axes[0][0]
    ax.barh(range(len(layers)), [l.density for l in layers], color="tab:blue")
    ax.set_yticks(range(len(layers)), [l.name[-28:] for l in layers], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("density (kept fraction)")
    ax.set_title(f"per-layer density, global {1 - report.sparsity.sparsity:.4f}")
    if history:
        # Accuracy on a linear axis, loss on its own log axis: an early validation loss of
        # hundreds (BatchNorm statistics settling) must not flatten every other curve.
        ax = axes[0][1]
        loss_ax = ax.twinx()
        epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
        for key in sorted({k for r in history for k, v in r.items() if isinstance(v, int | float)} - {"epoch"}):
            values = [r.get(key) for r in history]
            if "acc" in key:
                ax.plot(epochs, values, marker="s", label=key)
            elif "loss" in key:
                loss_ax.plot(epochs, values, marker="o", linestyle="--", label=key, alpha=0.7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (squares)")
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("loss (circles, log scale)")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title("sparse training")
        lines = ax.get_legend_handles_labels()
        more = loss_ax.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
