"""The order of the stages, written once: import → masks → sparse_train → export → validate → publish.

`run_all(config, run_stage)` takes how to run one stage: the plain CLI path calls the function, the
Prefect flow runs it as a task. Each stage gets paths, a view of the config holding only the fields it declares in
STAGE_FIELDS, and small records, and returns a small record, so a stage can be cached, retried or resumed on its
own. Both paths cache the same way: a finished stage's record is kept in run_dir/.stages/ under a key of what it
reads (see `cached_call`). Imports no flows/prefect/click.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import run_dir_for, sha256_file, sha256_json, write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig, ConfigView
from pipeline.errors import BadInputError, ForceCompressError, NetworkCutError

STAGE_NAMES = ("import", "masks", "sparse-train", "export", "validate", "publish")

# The CompressConfig fields each cached stage reads (through its function and everything it calls). A stage gets a
# ConfigView of exactly these, which raises on any other field, and its cache key hashes exactly these: so a change
# of `storage` redoes export and validation, never masks or training. Publish is never cached and reads it all.
_DATA = frozenset({"data", "val_fraction", "seed"})  # load_data's split and order
STAGE_FIELDS: dict[str, frozenset[str]] = {
    "import": frozenset({"image_size", "parity_tol", "train_norm"}),
    "masks": _DATA | {"method", "sparsity", "structure", "steps", "schedule", "mask_batch_size",
                      "mask_batches_per_step", "min_per_layer", "on_collapse", "channel_multiple", "train_norm",
                      "device"},
    "cut": _DATA | {"parity_tol"},
    # nproc: the world size changes the result slightly (float sums, per-rank BatchNorm statistics on CPU)
    "sparse-train": _DATA | {"image_size", "train_norm", "augment", "device", "epochs", "batch_size", "optimizer",
                             "lr", "momentum", "weight_decay", "lr_schedule", "nproc"},
    # method and sparsity: provenance in the file's metadata; _DATA and image_size: its preprocessing (mean/std, labels)
    "export": _DATA | {"method", "sparsity", "storage", "image_size"},
    "quantize": _DATA,
    "validate": _DATA | {"model", "name", "image_size", "device", "method", "sparsity", "min_accuracy",
                         "baseline_accuracy", "max_drop", "parity_tol"},
}
# The run directory holds one request's masks and trained weights: it is keyed on the fields of the stages up to
# training, less those that only decide whether a check passes (a new --parity-tol redoes import's check in the
# same directory; its unchanged normalized.onnx keeps the masks' key).
RUN_DIR_STAGES = ("import", "masks", "cut", "sparse-train")
CHECK_ONLY_FIELDS = frozenset({"parity_tol"})


def run_fingerprint(config: CompressConfig) -> dict:
    """The fields the run directory is keyed on (with the input model's hash)."""
    fields = frozenset().union(*(STAGE_FIELDS[s] for s in RUN_DIR_STAGES)) - CHECK_ONLY_FIELDS
    return config.model_dump(mode="json", include=set(fields))


def stage_names(config: CompressConfig) -> tuple[str, ...]:
    """The stages a request runs, in order: a channel structure cuts the graph between masks and training, INT8
    quantization comes between export and validation."""
    names = list(STAGE_NAMES)
    if config.structure == "channel":
        names.insert(names.index("sparse-train"), "cut")
    if config.quantize == "int8":
        names.insert(names.index("validate"), "quantize")
    return tuple(names)


@dataclass(frozen=True)
class Stage:
    """One call of a stage function: what `run_stage` receives. `outputs` are the files it writes; a
    cached result whose outputs are gone is recomputed."""

    name: str
    fn: Callable[..., Any]
    kwargs: dict
    outputs: tuple[str, ...] = ()
    cache: bool = True  # publish is idempotent by content and depends on the registry: never cached
    run_dir: str | None = None  # where the cached record goes (run_dir/.stages/); None: not cached


RunStage = Callable[[Stage], Any]
OnReused = Callable[[Stage, Any], None]


@dataclass(frozen=True)
class Request:
    """What the checks before any work found out about the input."""

    model_path: str
    source_sha256: str
    input_shape: tuple[int, int, int]
    num_classes: int
    run_dir: str


@dataclass(frozen=True)
class RunSummary:
    """The outcome of one request (`--json` prints `to_dict()`)."""

    model: str
    name: str
    run_dir: str
    passed: bool
    published: bool
    version: str | None
    registry_path: str | None
    top1: float
    top5: float
    sparsity: float
    target_sparsity: float
    provider: str
    sizes: dict
    latency_ms: dict
    failures: tuple[str, ...]
    stage_seconds: dict = field(default_factory=dict)
    report_md: str = ""
    effective_density: float | None = None  # kept weights on an input→output path / all prunable
    structure: str = "unstructured"
    costs: dict = field(default_factory=dict)  # {"input"|"exported": params, non-zero params, MACs per image}
    forms: list = field(default_factory=list)  # each form measured: role, file, size, gzip, top-1, p50 at batch 1/32
    reused: tuple[str, ...] = ()  # stages whose cached result was reused, in run order

    @property
    def exit_code(self) -> int:
        return 0 if self.published else 1

    def to_dict(self) -> dict:
        return {**asdict(self), "failures": list(self.failures), "reused": list(self.reused),
                "exit_code": self.exit_code}


# --- checks before any file is written --------------------------------------------------------------------


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise BadInputError unless `path` is (or can be created as) a writable directory; creates nothing."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if probe != p and not probe.is_dir():
        raise BadInputError(f"cannot create {what} directory {path}: {probe} is not a directory")
    if probe == p and not p.is_dir():
        raise BadInputError(f"{what} {path} is not a directory; choose another --{what.replace(' ', '-')}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} directory {path} is not writable ({probe}); choose another --{what}")


def check_request(config: CompressConfig) -> Request:
    """Everything that can be checked about the input before the run directory is created: the model file
    is readable ONNX with one image input, the data fits it, the registry and runs directories are writable (an
    MLflow registry: its URI is one we can use and its server answers)."""
    from pipeline.data import load_data
    from pipeline.devices import resolve_device
    from stages.onnx_convert.model_io import load_checked
    from stages.publish import check_model_name, mlflow_uri
    from stages.quantize import check_not_quantized
    from stages.validate import classifier_io

    check_model_name(config.model_name)
    resolve_device(config.device)  # CUDA asked for but absent: exit 3 before any work
    model = load_checked(config.model)
    if config.quantize == "int8":
        check_not_quantized(model, Path(config.model).name)
    _, input_shape, num_classes = classifier_io(model, config.image_size)
    load_data(config.data, input_shape, num_classes=num_classes, val_fraction=config.val_fraction,
              seed=config.seed, augment=False)
    uri = mlflow_uri(config.registry)
    if uri is None:
        check_writable_dir(config.registry, "registry")
    else:  # an MLflow Model Registry: a usable URI (exit 2) that answers now (exit 3)
        from stages.publish_mlflow import check_mlflow_registry

        check_mlflow_registry(uri)
    check_writable_dir(config.runs_dir, "runs-dir")
    source_sha = sha256_file(config.model)
    run_dir = run_dir_for(config.runs_dir, source_sha, run_fingerprint(config))
    return Request(str(config.model), source_sha, input_shape, num_classes, str(run_dir))


# --- the stages as called by run_all (paths and small records in, small records out) --------------------


def import_stage(model_path: str, run_dir: str, config: CompressConfig):
    from stages.import_onnx import import_onnx

    return import_onnx(model_path, run_dir, parity_tol=config.parity_tol, image_size=config.image_size,
                       train_norm=config.train_norm)


def masks_stage(normalized_path: str, run_dir: str, config: CompressConfig, input_shape: tuple, num_classes: int):
    from tqdm import tqdm

    from pipeline.data import load_data, mask_batches
    from pipeline.devices import resolve_device
    from stages.compute_masks import compute_masks_stage, mask_batch_count

    splits = load_data(config.data, input_shape, num_classes=num_classes, val_fraction=config.val_fraction,
                       seed=config.seed, augment=False)
    n = mask_batch_count(config.method, config.steps, config.mask_batches_per_step, config.structure)
    batches = mask_batches(splits, config.mask_batch_size, n, seed=config.seed)
    # disable=None: no carriage-return bar in non-terminal logs (CI jobs)
    bar = tqdm(total=config.steps, desc=f"masks ({config.method})", leave=False, unit="step", disable=None)

    def progress(step: int, total: int, info: dict) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in info.items() if isinstance(v, float)}, refresh=False)

    try:
        return compute_masks_stage(
            normalized_path, Path(run_dir) / "masks.npz", method=config.method, density=config.density,
            steps=config.steps, schedule=config.schedule, batches=batches,
            batches_per_step=config.mask_batches_per_step, seed=config.seed, progress=progress,
            device=resolve_device(config.device), train_norm=config.train_norm, on_collapse=config.on_collapse,
            min_per_layer=config.min_per_layer, structure=config.structure, channel_multiple=config.channel_multiple,
        )
    finally:
        bar.close()


def cut_stage(normalized_path: str, masks_path: str, run_dir: str, config: CompressConfig, input_shape: tuple,
              num_classes: int):
    import torch

    from pipeline.data import load_data
    from stages.cut_channels import cut_stage as cut

    splits = load_data(config.data, input_shape, num_classes=num_classes, val_fraction=config.val_fraction,
                       seed=config.seed, augment=False)
    images, _ = splits.train.batch(torch.arange(min(32, len(splits.train))))  # training images: proof only
    return cut(normalized_path, masks_path, run_dir, images=images.numpy(), parity_tol=config.parity_tol)


def train_stage(normalized_path: str, masks_path: str, run_dir: str, config: CompressConfig):
    from stages.train_worker import launches, sparse_train_processes

    if launches(config.nproc):  # data-parallel: torchrun runs this stage in nproc processes, this one waits for them
        return sparse_train_processes(normalized_path, masks_path, config, run_dir)
    from stages.sparse_train import sparse_train

    return sparse_train(normalized_path, masks_path, config, run_dir)


def export_stage(normalized_path: str, state_path: str, masks_path: str, run_dir: str, config: CompressConfig,
                 source_sha256: str):
    from stages.export_onnx import export_onnx, training_preprocessing

    provenance = {"source_sha256": source_sha256, "method": config.method, "sparsity": config.sparsity}
    return export_onnx(normalized_path, state_path, Path(run_dir) / "model.sparse.onnx", masks_path=masks_path,
                       storage=config.storage, provenance=provenance, compact_path=Path(run_dir) / COMPACT_NAME,
                       preprocessing=training_preprocessing(normalized_path, config))


COMPACT_NAME = "model.compact.onnx"


def quantize_stage(exported_path: str, run_dir: str, config: CompressConfig, input_shape: tuple, num_classes: int):
    import torch

    from pipeline.data import load_data
    from stages.quantize import INT8_NAME, quantize_int8

    splits = load_data(config.data, input_shape, num_classes=num_classes, val_fraction=config.val_fraction,
                       seed=config.seed, augment=False)
    n = min(256, len(splits.train))  # calibration: training images only, never the held-out split
    images, _ = splits.train.batch(torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:n])
    return quantize_int8(exported_path, Path(run_dir) / INT8_NAME, images.numpy())


def validate_stage(exported_path: str, run_dir: str, config: CompressConfig, normalized_path: str, state_path: str,
                   masks_path: str | None, history_path: str | None, uncut_path: str | None = None,
                   compact_path: str | None = None, int8_path: str | None = None, int8_info: dict | None = None):
    from stages.validate import validate

    return validate(exported_path, config, run_dir, input_path=config.model, normalized_path=normalized_path,
                    state_path=state_path, history_path=history_path, masks_path=masks_path, uncut_path=uncut_path,
                    compact_path=compact_path, int8_path=int8_path, int8_info=int8_info)


def publish_stage(run_dir: str, report, config: CompressConfig, masks_path: str):
    from stages.publish import publish

    return publish(run_dir, report, config, masks_path=masks_path)


# --- the order, once ----------------------------------------------------------------------------------------


def run_step(name: str, fn: Callable[..., Any], record_dir: str, full_config: CompressConfig, run_stage: RunStage,
             on_reused: OnReused | None = None, /, *, outputs=(), cache: bool = True, **kwargs) -> tuple[Any, bool]:
    """(result, reused) of one stage call `fn(**kwargs)` through `cached_call`, its record in `record_dir`. A cached
    stage given a `config` sees, and is keyed on, only the fields of `full_config` it declares (STAGE_FIELDS);
    `on_reused` hears of a reuse."""
    if cache and "config" in kwargs:
        kwargs["config"] = ConfigView(full_config, STAGE_FIELDS[name])
    stage = Stage(name, fn, kwargs, tuple(str(o) for o in outputs), cache, record_dir if cache else None)
    result, hit = cached_call(stage, run_stage)
    if hit and on_reused is not None:
        on_reused(stage, result)
    return result, hit


def drop_checkpoint(trained, config: CompressConfig) -> None:
    """A finished training's trained.pt holds the result: drop its resume state unless --keep-checkpoint."""
    if trained.completed and not config.keep_checkpoint:
        Path(trained.checkpoint_path).unlink(missing_ok=True)


def run_all(config: CompressConfig, run_stage: RunStage, *, request: Request | None = None,
            on_reused: OnReused | None = None, publish: bool = True) -> RunSummary:
    """Run every stage in order through `run_stage`, except those whose cached result is still good (see
    `cached_call`; `on_reused(stage, result)` hears of each); a gate failure returns a summary with `published`
    False (nothing is published), as does `publish=False` (a sweep's cells: the sweep publishes one). Bad input
    found by a stage removes the run directory this call created."""
    request = request or check_request(config)
    if config.nproc > 1:  # more processes than GPUs: exit 2 before any file is written
        from stages.train_worker import check_nproc

        check_nproc(config.nproc, config.device)
    run_dir = Path(request.run_dir)
    created = [p for p in (Path(config.runs_dir), run_dir) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", config.model_dump(mode="json"))  # the latest request's
    rd = str(run_dir)
    seconds: dict[str, float] = {}
    reused: list[str] = []

    def step(name, fn, outputs=(), cache=True, **kwargs):
        t = time.perf_counter()
        result, hit = run_step(name, fn, rd, config, run_stage, on_reused, outputs=outputs, cache=cache, **kwargs)
        seconds[name] = round(time.perf_counter() - t, 3)
        if hit:
            reused.append(name)
        return result

    try:
        imported = step("import", import_stage, [run_dir / "normalized.onnx"],
                        model_path=request.model_path, run_dir=rd, config=config)
        normalized = str(imported.normalized_path)
        masks = step("masks", masks_stage, [run_dir / "masks.npz", run_dir / "masks.json"],
                     normalized_path=normalized, run_dir=rd, config=config, input_shape=tuple(request.input_shape),
                     num_classes=request.num_classes)
        masks_path = str(masks.masks_path)
        if config.cut_check:
            check_cut(masks, config)
        # A channel cut: training, export and validation work on the smaller graph, which trains dense.
        graph, train_masks, uncut = normalized, masks_path, None
        if config.structure == "channel":
            cut = step("cut", cut_stage, [run_dir / "cut.onnx", run_dir / "cut_masks.npz"],
                       normalized_path=normalized, masks_path=masks_path, run_dir=rd, config=config,
                       input_shape=tuple(request.input_shape), num_classes=request.num_classes)
            graph, train_masks, uncut = str(cut.cut_path), str(cut.masks_path), normalized
        trained = step("sparse-train", train_stage, [run_dir / "trained.pt"], normalized_path=graph,
                       masks_path=train_masks, run_dir=rd, config=config)
        drop_checkpoint(trained, config)
        state_path = str(trained.state_path)
        exported = step("export", export_stage, [run_dir / "model.sparse.onnx"], normalized_path=graph,
                        state_path=state_path, masks_path=train_masks, run_dir=rd, config=config,
                        source_sha256=request.source_sha256)
        history = str(trained.history_path) if trained.history_path else None
        int8_path, int8_info = None, None
        if config.quantize == "int8":
            quantized = step("quantize", quantize_stage, [run_dir / "model.int8.onnx"],
                             exported_path=str(exported.out_path), run_dir=rd, config=config,
                             input_shape=tuple(request.input_shape), num_classes=request.num_classes)
            int8_path = str(quantized.out_path)
            int8_info = {k: v for k, v in asdict(quantized).items() if k != "out_path"}
        compact = str(exported.compact_path) if exported.compact_path else None
        report = step("validate", validate_stage, [run_dir / "report.json", run_dir / "report.md"],
                      exported_path=str(exported.out_path), run_dir=rd, config=config,
                      normalized_path=graph, state_path=state_path, masks_path=masks_path,
                      history_path=history, uncut_path=uncut, compact_path=compact, int8_path=int8_path,
                      int8_info=int8_info)
        published = None
        if report.passed and publish:
            published = step("publish", publish_stage, cache=False, run_dir=rd, report=report, config=config,
                             masks_path=masks_path)
    except BadInputError:
        for p in reversed(created):  # bad input leaves nothing behind
            shutil.rmtree(p, ignore_errors=True)
        raise
    except ForceCompressError:
        raise
    except Exception:  # an internal error: keep the traceback beside the run's files
        write_bytes_atomic(run_dir / "error.txt", traceback.format_exc().encode())
        raise

    summary = RunSummary(
        model=config.model, name=config.model_name, run_dir=rd, passed=report.passed,
        published=published is not None, version=published.version if published else None,
        registry_path=published.path if published else None, top1=report.top1, top5=report.top5,
        sparsity=report.sparsity.sparsity, target_sparsity=config.sparsity, provider=report.provider,
        sizes=report.sizes, latency_ms=report.latency_ms, failures=report.failures, stage_seconds=seconds,
        report_md=report.report_md, effective_density=masks.effective_density, structure=config.structure,
        costs=report.costs, forms=[_form_summary(f) for f in report.forms], reused=tuple(reused),
    )
    write_json_atomic(run_dir / "summary.json", summary.to_dict())
    return summary


def _form_summary(form: dict) -> dict:
    return {**{k: form[k] for k in ("role", "file", "size", "gzip_size", "top1", "sha256")},
            **{f"p50_ms_batch{b}": t["p50"] for b, t in form["latency_ms"].items()}}


# A mask set with fewer than this fraction of its kept weights on an input→output path (effective density /
# density) is stopped before training, as is one with none. Measured on the benchmark networks (issue 11; digits,
# 30 epochs; chance 0.101): every mask set with no weight on a path trained to 0.101; random masks with 0.017,
# 0.036 and 0.093 of their weights on a path (resnet20 at 99.7%, vgg19 at 99.5%) reached 0.101–0.123; from 0.10
# up they trained above chance (0.101 → 0.268, 0.18 → 0.196, 0.33 → 0.223, 0.39 → 0.408). A healthy mask set
# may still waste many weights: random at 95% on mobilenet_v3_small keeps 0.25 on a path, at 98% on vgg19 0.53
# (top-1 0.966); FORCE and Iterative SNIP kept ≥ 0.79 in every benchmark cell that trained above chance.
CUT_FRACTION = 0.1


def check_cut(masks, config: CompressConfig) -> None:
    """Raise NetworkCutError (exit 1, before training) when the masks cut every input→output path, or leave
    fewer than CUT_FRACTION of the kept weights on one. Masks not measured (effective_density None) pass."""
    effective = masks.effective_density
    if effective is None or (effective > 0 and effective >= CUT_FRACTION * masks.density):
        return
    cut = masks.cut_layers
    empty = [n for n in cut if n in masks.disconnected]  # the cause, when there is one: named first
    cut_off = [n for n in cut if n not in masks.disconnected]
    names = "; ".join(f"{label}: {_first(group)}" for label, group in (("empty", empty), ("cut off", cut_off)) if group)
    where = f"{len(cut)} layer(s) keep no weight on an input→output path ({names})" if cut else \
        "no layer is cut off, but almost no kept weight lies on an input→output path"
    raise NetworkCutError(
        f"the masks cut the network: {where}; effective density {effective:.4g} vs target {config.density:.4g}. "
        f"Try --method iter_snip, a lower --sparsity or more --steps (masks kept in {masks.masks_path}; "
        "--no-cut-check trains anyway)")


def _first(names, n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def call_stage(stage: Stage) -> Any:
    """The plain way to run a stage: call it."""
    return stage.fn(**stage.kwargs)


# --- describing and keying stages (shared by the CLI and the flow) ---------------------------------------


def describe(name: str, result: Any) -> str:
    """One line about a finished stage's result."""
    try:
        return _describe(name, result)
    except (AttributeError, TypeError, ValueError):  # a record of another shape: say nothing rather than fail
        return ""


def _describe(name: str, r: Any) -> str:
    if name == "import":
        return (f"{Path(r.normalized_path).name}, opset {r.opset}, {r.n_prunable} prunable tensors, "
                f"parity {r.parity_max_abs:.1e}")
    if name == "masks":
        kept = r.kept if isinstance(r.kept, int) else sum(r.kept.values())
        effective = "" if r.effective_density is None else f", effective {r.effective_density:.4f}"
        return f"density {r.density:.4f} ({kept} kept of {r.total}){effective}"
    if name == "cut":
        before, after = r.costs_before, r.costs_after
        return (f"{r.channels_kept} of {r.channels_total} channels kept; parameters {before['params']:,} → "
                f"{after['params']:,}, MACs {before['macs'] / 1e6:,.1f}M → {after['macs'] / 1e6:,.1f}M; "
                f"parity with the masked model {r.parity_max_rel:.1e}")
    if name == "sparse-train":
        norm = f", train-time BatchNorm on {len(r.train_norm_layers)} fused layer(s)" if r.train_norm_layers else ""
        resumed = f" (resumed from epoch {r.resumed_from_epoch})" if r.resumed_from_epoch else ""
        world = f" on {r.world_size} processes" if r.world_size > 1 else ""
        return (f"{r.epochs} epoch(s){resumed}{world}, train acc {r.train_acc:.4f}, val acc {r.val_acc:.4f}, "
                f"{r.images_per_s:.0f} img/s{norm}")
    if name == "export":
        compact = f", {Path(r.compact_path).name} ({r.sparse_size_bytes / 1e6:.2f} MB)" if r.compact_path else ""
        return f"{Path(r.out_path).name} ({r.size_bytes / 1e6:.2f} MB){compact}"
    if name == "quantize":
        left = f", {len(r.fp32_nodes)} node(s) left in FP32" if r.fp32_nodes else ""
        return f"{Path(r.out_path).name} ({Path(r.out_path).stat().st_size / 1e6:.2f} MB){left}"
    if name == "validate":
        verdict = "gate passed" if r.passed else "gate FAILED: " + "; ".join(r.failures)
        return f"top-1 {r.top1:.4f}, sparsity {r.sparsity.sparsity:.4f} on {r.provider}; {verdict}"
    if name == "publish":
        return f"{r.path} ({'new' if r.created else 'same content as before'})"
    return ""


def _digest(value: Any) -> Any:
    """A stable, small stand-in for a stage argument: files by content hash, a config view by its declared fields
    (a whole config by its fingerprint)."""
    if isinstance(value, ConfigView):
        return {"fields": _digest(value.values())}
    if isinstance(value, CompressConfig):
        return value.fingerprint()
    if isinstance(value, str | os.PathLike) and Path(value).is_file():
        return {"path": str(value), "sha256": _file_sha256(value)}
    if is_dataclass(value) and not isinstance(value, type):
        return _digest(asdict(value))
    if isinstance(value, dict):
        return {str(k): _digest(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_digest(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the code a stage result depends on (force_core, pipeline, stages): editing it invalidates caches."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("force_core", "pipeline", "stages"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name != "cli.py":
                h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)  # trained.pt (~100 MB for a resnet18) is an input of two stages: hash it once per content
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_file(path)


def stage_key(stage: Stage) -> str:
    """Cache key of a stage call: its name and function, the code version, its input files' hashes and the
    declared config fields' values (never a pickle of the inputs)."""
    fn = f"{stage.fn.__module__}.{stage.fn.__qualname__}"
    return sha256_json({"stage": stage.name, "fn": fn, "code": code_version(), "args": _digest(stage.kwargs)})


STAGE_RECORDS = ".stages"


def record_path(stage: Stage) -> Path | None:
    """run_dir/.stages/<stage>.pkl: the last finished call of the stage in this run directory, with its key."""
    return Path(stage.run_dir) / STAGE_RECORDS / f"{stage.name}.pkl" if stage.cache and stage.run_dir else None


def cached_call(stage: Stage, run_stage: RunStage) -> tuple[Any, bool]:
    """(result, reused): the recorded result when the stage's record has the same key (code version, input files'
    hashes, declared config fields) and its output files exist; else `run_stage(stage)`, then its record. The
    record is removed before the stage runs, so one left behind always describes the files beside it, whoever
    (plain path or flow, this request or another) wrote them last."""
    path = record_path(stage)
    if path is None:
        return run_stage(stage), False
    key = stage_key(stage)
    if path.exists() and all(Path(p).exists() for p in stage.outputs):
        try:
            # Our own file in our own run directory (as checkpoint.pt is); any unreadable record is a miss.
            record = pickle.loads(path.read_bytes())
            if record["key"] == key:
                return record["result"], True
        except Exception:  # noqa: BLE001 - a stale or torn record: run the stage
            pass
    path.unlink(missing_ok=True)
    result = run_stage(stage)
    write_bytes_atomic(path, pickle.dumps({"key": key, "stage": stage.name, "result": result}))
    return result, False
