"""Validate an exported model with onnxruntime: accuracy, sparsity read from the file, parity with torch,
latency and sizes, and the gate; writes report.json, report.md and report.png. Imports no flows/prefect/click.

Everything is measured on the file a user would deploy, never on the torch module: sparsity counts the
zeros stored in the ONNX initializers, accuracy comes from an onnxruntime session on it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.artifacts import atomic_path, write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, InvalidModelError
from pipeline.plotting import drawn_alone
from stages.latency import fixed_batch
from stages.model_forms import FORM_LABELS, Form, int8_sparse_form, measure_forms
from stages.onnx_convert.costs import model_costs
from stages.onnx_convert.model_io import model_bytes
from stages.onnx_convert.sparsity import FileSparsity, LayerSparsity, file_sparsity

ORT_DENSE_SPEED = (
    "onnxruntime multiplies unstructured zeros like any other value, so the pruned model runs at dense "
    "speed: what this sparsity buys today is the file size (gzipped or with sparse initializers) at the "
    "accuracy shown, not lower latency."
)


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    message: str


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
    forms: tuple[dict, ...] = ()  # every form measured (stages.model_forms): input, fp32, compact, int8, ...
    int8: dict = dataclasses.field(default_factory=dict)  # the quantize stage's notes: FP32 nodes, CPU features

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[str, ...]:
        return tuple(c.message for c in self.checks if not c.passed)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sparsity"].update(sparsity=self.sparsity.sparsity, params_sparsity=self.sparsity.params_sparsity)
        for layer, obj in zip(d["sparsity"]["layers"], self.sparsity.layers, strict=True):
            layer["density"] = obj.density
        d.update(passed=self.passed, failures=list(self.failures))
        return d


def validate(
    exported_path: str | Path,
    config: CompressConfig,
    run_dir: str | Path,
    *,
    input_path: str | Path | None = None,
    normalized_path: str | Path | None = None,
    state_path: str | Path | None = None,
    history_path: str | Path | None = None,
    masks_path: str | Path | None = None,
    uncut_path: str | Path | None = None,
    compact_path: str | Path | None = None,
    int8_path: str | Path | None = None,
    int8_info: dict | None = None,
    reference=None,
    val=None,
    latency_runs: int = 30,
) -> ValidationReport:
    """Measure `exported_path` and apply the gate of `config`; write report.json/md/png into `run_dir`.

    The torch side of the parity check is `reference` when given, else the module rebuilt from
    `normalized_path` with the trained `state_path` loaded (what export wrote back), else the module
    converted from the exported file itself. `val` is the held-out dataset of (image, label) pairs;
    default: `pipeline.data.load_data(config.data, ...).val`, the same split training held out. The effective
    density and cut layers come from the sidecar (masks.json) of `masks_path`, when given. `uncut_path`: the
    normalised model before a channel cut; sparsity and the costs' "input" column are then measured against it.
    `compact_path` / `int8_path`: the other forms of the model (sparse initializers, INT8), measured with the same
    code and gated too (`int8_info`: what the quantize stage reported).
    """
    from stages.onnx_convert import runtime

    exported_path, run_dir = Path(exported_path), Path(run_dir)
    input_path = Path(input_path or config.model)
    model = _load(exported_path)
    input_name, input_shape, num_classes = classifier_io(model, config.image_size)

    device = resolve_device(config.device)  # onnxruntime gets CUDA only when asked for and present
    session = runtime.session(exported_path, device=device)
    provider = session.get_providers()[0]

    if val is None:
        from pipeline.data import load_data

        val = load_data(
            config.data, input_shape, num_classes=num_classes, val_fraction=config.val_fraction,
            seed=config.seed, augment=False,
        ).val
    first_batch = _first_images(val)

    sparsity = file_sparsity(model)
    if reference is None:
        reference = _reference_module(exported_path, normalized_path, state_path)
    parity_abs, parity_rel = parity(reference, session, input_name, first_batch)

    forms = [Form("input", input_path), Form("fp32", exported_path)]
    forms += [Form("compact", Path(compact_path))] if compact_path else []
    int8_info = dict(int8_info or {})
    if int8_path:
        forms.append(Form("int8", Path(int8_path)))
        x = first_batch[: _fixed_batch(model) or len(first_batch)]
        int8_compact, why = int8_sparse_form(Path(int8_path), run_dir / "model.int8.compact.onnx", x)
        forms += [Form("int8_compact", int8_compact)] if int8_compact else []
        int8_info["int8_sparse_initializers"] = why or "onnxruntime runs it with the INT8 file's outputs"
    measured = measure_forms(forms, val, input_shape, device=device, runs=latency_runs)
    top1, top5 = measured[1]["top1"], measured[1]["top5"]  # the exported file, scored once with the other forms
    latency = {"input": measured[0]["latency_ms"]["1"],
               "exported": {k: v for k, v in measured[1]["latency_ms"]["1"].items() if k != "ratio"},
               "ratio": {**measured[1]["latency_ms"]["1"]["ratio"], "batch": 1}}
    sizes = file_sizes(input_path, exported_path, model)
    uncut = _load(Path(uncut_path)) if uncut_path is not None else None
    costs = {"input": model_costs(uncut or _load(input_path), input_shape).to_dict(),
             "exported": model_costs(model, input_shape).to_dict()}
    if uncut is not None:  # a channel cut: sparsity counts what is gone from the uncut model's weights
        sparsity = removed_sparsity(sparsity, file_sparsity(uncut))
    checks = gate(config, top1=top1, sparsity=sparsity, parity_rel=parity_rel) + form_checks(config, measured)

    report = ValidationReport(
        exported_path=str(exported_path),
        report_json=str(run_dir / "report.json"),
        report_md=str(run_dir / "report.md"),
        report_png=str(run_dir / "report.png"),
        provider=provider,
        n_val=len(val),
        top1=top1,
        top5=top5,
        target_sparsity=config.sparsity,
        sparsity=sparsity,
        parity_max_abs=parity_abs,
        parity_max_rel=parity_rel,
        latency_ms=latency,
        sizes=sizes,
        checks=tuple(checks),
        baseline_accuracy=config.baseline_accuracy,
        structure="channel" if uncut is not None else "unstructured",
        costs=costs,
        forms=tuple(measured),
        int8=int8_info,
        **_from_masks_sidecar(masks_path),
    )
    history = _read_history(history_path)
    write_plot(report, history, report.report_png)
    write_bytes_atomic(report.report_md, render_markdown(report, config).encode())
    write_json_atomic(report.report_json, report.to_dict())
    return report


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


def removed_sparsity(cut: FileSparsity, uncut: FileSparsity) -> FileSparsity:
    """The cut file's zeros counted against the uncut model: a removed channel's weights count as zeros. Layers
    keep the uncut shapes (matched by initializer name, which the cut keeps), so per-layer density is the kept
    fraction of the original layer."""
    kept = {l.name: l.numel - l.zeros for l in cut.layers}
    layers = tuple(LayerSparsity(l.name, l.op, l.shape, l.numel, l.numel - kept.get(l.name, 0)) for l in uncut.layers)
    nonzero = cut.prunable_total - cut.prunable_zeros
    params_nonzero = cut.params_total - cut.params_zeros
    return FileSparsity(layers, uncut.prunable_total, uncut.prunable_total - nonzero, uncut.params_total,
                        uncut.params_total - params_nonzero)


def _from_masks_sidecar(masks_path) -> dict:
    """effective_density, cut_layers, train_norm_layers and collapse_step from masks.json beside `masks_path`
    (each absent in older sidecars)."""
    side = Path(masks_path).with_suffix(".json") if masks_path else None
    if side is None or not side.exists():
        return {}
    meta = json.loads(side.read_text())
    out = {"train_norm_layers": tuple(meta.get("train_norm_layers", ())), "collapse_step": meta.get("collapse_step")}
    if meta.get("structure") == "channel":
        out["channels"] = {k: meta[k] for k in ("channels_kept", "channels_total", "blocked") if k in meta}
    if "effective_density" in meta:
        out.update(effective_density=meta["effective_density"], cut_layers=tuple(meta.get("cut_layers", ())))
    return out


# --- reading the file -------------------------------------------------------------------------------------


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError… for a bad file
        raise InvalidModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def classifier_io(model: onnx.ModelProto, image_size: Sequence[int] | None = None) -> tuple[str, tuple, int]:
    """(input name, (C, H, W), number of classes) of a single-image-input classifier; a dynamic H/W comes
    from `image_size`, a dynamic class count from one onnxruntime run on zeros."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BadInputError(f"expected a classifier with one image input, got inputs {[i.name for i in inputs]}")
    if len(model.graph.output) != 1:
        raise BadInputError(f"expected a classifier with one output (the logits), got outputs "
                            f"{[o.name for o in model.graph.output]}; export the model with its logits only")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise BadInputError(f"model input {inputs[0].name!r} has shape {dims}; expected (N, C, H, W) images")
    c, h, w = dims[1:]
    if image_size is not None:
        if h is not None and w is not None and (h, w) != tuple(int(v) for v in image_size):
            raise BadInputError(f"model input {inputs[0].name!r} is fixed at {h}x{w}; --image-size applies "
                                f"only to models with a dynamic size (got {image_size[0]} {image_size[1]})")
        h, w = (int(v) for v in image_size)
    if c is None or h is None or w is None:
        raise BadInputError(f"model input {inputs[0].name!r} has a dynamic size {dims}; pass --image-size H W")
    out = model.graph.output[0].type.tensor_type.shape.dim
    num_classes = out[-1].dim_value if len(out) and out[-1].HasField("dim_value") else 0
    if not num_classes:
        from stages.onnx_convert import runtime

        session = runtime.session(model.SerializeToString())
        x = np.zeros((dims[0] or 1, c, h, w), np.float32)
        num_classes = int(session.run(None, {inputs[0].name: x})[0].shape[-1])
    return inputs[0].name, (int(c), int(h), int(w)), int(num_classes)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    d0 = inp.type.tensor_type.shape.dim[0]
    return d0.dim_value if d0.HasField("dim_value") and d0.dim_value > 0 else None




def file_sizes(input_path: Path, exported_path: Path, model: onnx.ModelProto) -> dict:
    """Bytes of the input file and of the exported model dense, gzipped, and with sparse initializers."""
    from stages.export_onnx import sparse_initializer_bytes

    dense_model = _densified(model)
    dense = dense_model.SerializeToString()
    sizes = {"input": model_bytes(input_path), "exported": model_bytes(exported_path),
             "dense": len(dense), "dense_gzip": len(gzip.compress(dense, compresslevel=6))}
    sparse = sparse_initializer_bytes(dense_model)
    sizes["sparse_initializers"] = len(sparse)
    sizes["sparse_initializers_gzip"] = len(gzip.compress(sparse, compresslevel=6))
    return sizes


def _densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every sparse_initializer of its main graph written back as a dense initializer."""
    if not model.graph.sparse_initializer:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for st in out.graph.sparse_initializer:
        values = numpy_helper.to_array(st.values)
        dense = np.zeros(math.prod(st.dims), values.dtype)
        indices = numpy_helper.to_array(st.indices)
        if indices.ndim == 2:  # [NNZ, rank] coordinates instead of linear indices
            indices = np.ravel_multi_index(indices.T, tuple(st.dims))
        dense[indices] = values
        out.graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(st.dims)), st.values.name))
    del out.graph.sparse_initializer[:]
    return out


# --- measuring --------------------------------------------------------------------------------------------


def _batches(dataset, batch_size: int):
    import torch

    for start in range(0, len(dataset), batch_size):
        if hasattr(dataset, "batch"):  # pipeline.data's in-memory datasets serve whole batches
            x, y = dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))))
            yield x.numpy().astype(np.float32, copy=False), y.numpy()
            continue
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = np.stack([np.asarray(it[0], dtype=np.float32) for it in items])
        y = np.asarray([int(it[1]) for it in items])
        yield x, y


def _run(session, input_name: str, x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    if fixed_batch is None:
        return session.run(None, {input_name: x})[0]
    outs = []
    for start in range(0, len(x), fixed_batch):  # a model exported with a fixed batch: pad the last chunk
        chunk = x[start : start + fixed_batch]
        pad = fixed_batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {input_name: chunk})[0][: fixed_batch - pad])
    return np.concatenate(outs)


def onnx_accuracy(model_path: str | Path, dataset, *, device="cpu", threads: int | None = None) -> tuple[float, float]:
    """Top-1 and top-5 of an ONNX classifier under onnxruntime on `dataset` (what the gate scores)."""
    from stages.onnx_convert import runtime

    session = runtime.session(model_path, device=device, threads=threads)
    top1, top5 = _accuracy(session, session.get_inputs()[0].name, dataset, fixed_batch(session))
    return top1, top5


_EMPTY_SPLIT = "the held-out split is empty; raise --val-fraction or give more data"


def _first_images(dataset, n: int = 16) -> np.ndarray:
    """The first `n` held-out images (what parity compares on)."""
    if len(dataset) == 0:
        raise BadInputError(_EMPTY_SPLIT)
    return next(_batches(dataset, n))[0]


def _accuracy(session, input_name: str, dataset, fixed_batch: int | None,
              batch_size: int = 256) -> tuple[float, float]:
    """Top-1 and top-5 of `session` on `dataset`."""
    if len(dataset) == 0:
        raise BadInputError(_EMPTY_SPLIT)
    hits1 = hits5 = n = 0
    for x, y in _batches(dataset, batch_size):
        logits = _run(session, input_name, x, fixed_batch)
        k = min(5, logits.shape[1])
        topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hits1 += int((topk[:, 0] == y).sum())
        hits5 += int((topk == y[:, None]).any(axis=1).sum())
        n += len(y)
    return hits1 / n, hits5 / n


def _reference_module(exported_path: Path, normalized_path, state_path):
    import torch

    from stages.import_onnx import load_module

    if normalized_path is not None and state_path is not None:
        module, _ = load_module(normalized_path)
        module.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    else:
        module, _ = load_module(exported_path)
    return module


def parity(reference, session, input_name: str, x: np.ndarray) -> tuple[float, float]:
    """Max abs difference between torch and onnxruntime on the same inputs, and that difference relative to
    the largest torch output (a scale-free figure the tolerance applies to)."""
    import torch

    reference = reference.eval().to("cpu")
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).float().numpy()
    got = _run(session, input_name, x, fixed_batch(session))
    diff = float(np.max(np.abs(want - got))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return diff, diff / max(scale, 1e-12)


# --- the gate ---------------------------------------------------------------------------------------------


def gate(config: CompressConfig, *, top1: float, sparsity: FileSparsity, parity_rel: float) -> list[GateCheck]:
    """Each condition of the gate with whether it passed and, when not, by how much it missed."""
    checks = [
        GateCheck(
            "min_accuracy",
            top1 >= config.min_accuracy,
            f"top-1 accuracy {top1:.4f} vs minimum {config.min_accuracy:.4f}"
            + ("" if top1 >= config.min_accuracy else f" (short by {config.min_accuracy - top1:.4f})"),
        )
    ]
    if config.baseline_accuracy is not None and config.max_drop is not None:
        drop = config.baseline_accuracy - top1
        ok = drop <= config.max_drop + 1e-12
        checks.append(GateCheck(
            "max_drop", ok,
            f"accuracy drop {drop:.4f} from baseline {config.baseline_accuracy:.4f} vs allowed {config.max_drop:.4f}"
            + ("" if ok else f" (over by {drop - config.max_drop:.4f})"),
        ))
    # "Within one weight": exact top-k keeps round(density * total), which may sit one weight short.
    wanted = config.sparsity * sparsity.prunable_total
    ok = sparsity.prunable_total > 0 and sparsity.prunable_zeros + 1 >= wanted
    checks.append(GateCheck(
        "sparsity", ok,
        f"sparsity {sparsity.sparsity:.4f} ({sparsity.prunable_zeros}/{sparsity.prunable_total} prunable weights zero)"
        f" vs target {config.sparsity:.4f}"
        + ("" if ok else f" (short by {math.ceil(wanted - 1 - sparsity.prunable_zeros)} weights)"),
    ))
    ok = parity_rel <= config.parity_tol  # False for NaN
    if not math.isfinite(parity_rel):
        message = "torch/onnxruntime outputs are not finite (NaN or inf: did training diverge?)"
    else:
        message = (f"torch/onnxruntime relative difference {parity_rel:.2e} vs tolerance {config.parity_tol:.0e}"
                   + ("" if ok else f" (over by {parity_rel / config.parity_tol:.1f}x)"))
    checks.append(GateCheck("parity", ok, message))
    return checks


def form_checks(config: CompressConfig, forms: list[dict]) -> list[GateCheck]:
    """The gate for the forms beside the primary file: each reaches the minimum accuracy; the INT8 file keeps every
    pruned weight at exactly 0 and, with --max-drop, loses at most that much against the FP32 export."""
    by_role = {f["role"]: f for f in forms}
    fp32, checks = by_role["fp32"], []
    for f in forms:
        if f["role"] in ("input", "fp32"):
            continue
        label = FORM_LABELS[f["role"]]
        ok = f["top1"] >= config.min_accuracy
        checks.append(GateCheck(f"min_accuracy_{f['role']}", ok,
                                f"{label}: top-1 {f['top1']:.4f} vs minimum {config.min_accuracy:.4f}"
                                + ("" if ok else f" (short by {config.min_accuracy - f['top1']:.4f})")))
    int8 = by_role.get("int8")
    if int8 is not None:
        lost = fp32["prunable_zeros"] - int8["prunable_zeros"]
        ok = int8["prunable_total"] == fp32["prunable_total"] and lost <= 0
        more = -lost if lost < 0 else 0
        checks.append(GateCheck("int8_sparsity", ok,
                                f"INT8 prunable weights at zero: {int8['prunable_zeros']:,} of "
                                f"{int8['prunable_total']:,} vs FP32 {fp32['prunable_zeros']:,} of "
                                f"{fp32['prunable_total']:,}"
                                + (f" ({more:,} more rounded to 0)" if ok and more else "")
                                + ("" if ok else " (pruned weights lost their zero)")))
        if config.max_drop is not None:
            drop = fp32["top1"] - int8["top1"]
            ok = drop <= config.max_drop + 1e-12
            checks.append(GateCheck("int8_max_drop", ok,
                                    f"INT8 drop {drop:.4f} from the FP32 export's {fp32['top1']:.4f} vs allowed "
                                    f"{config.max_drop:.4f}"
                                    + ("" if ok else f" (over by {drop - config.max_drop:.4f})")))
    return checks


# --- the report -------------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.3f} MB"


def render_markdown(report: ValidationReport, config: CompressConfig) -> str:
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
        f"| top-1 / top-5 (held-out, {report.n_val} images) | {report.top1:.4f} / {report.top5:.4f} |",
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
    rows = ["| form | file | size | gzip | top-1 | batch 1 p50 / p90 | batch 32 p50 / p90 | ÷ input, batch 32 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in report.forms:
        b1, b32 = f["latency_ms"]["1"], f["latency_ms"]["32"]
        ratio = b32.get("ratio")
        rows.append(f"| {FORM_LABELS[f['role']]} | `{f['file']}` | {_mb(f['size'])} | {_mb(f['gzip_size'])} "
                    f"| {f['top1']:.4f} | {b1['p50']:.3f} / {b1['p90']:.3f} ms "
                    f"| {b32['p50']:.2f} / {b32['p90']:.2f} ms "
                    f"| {'–' if ratio is None else format(ratio['median'], '.3f')} |")
    return rows


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
    by_role = {f["role"]: f for f in report.forms}
    if "int8" not in by_role:
        return []
    from stages.latency import ratio_of

    fp32, int8, info = by_role["fp32"], by_role["int8"], report.int8
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


def _read_history(path) -> list[dict]:
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
