"""The order of the stages, written once: import → masks → [cut] → sparse-train → export → [quantize] → validate
→ publish. `run_all(config, run_stage)` takes how to run one stage: the plain CLI path calls the function, the
Prefect flow runs it as a task. Each stage gets paths, small records, the run's opened data and a view of the config
holding only the fields it declares, and returns a record that describes itself; results come back in memory.
Imports no flows/prefect/click."""

from __future__ import annotations

import contextlib
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import RunFiles, write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig
from pipeline.errors import BadInputError, ForceCompressError, environment_problem
from pipeline.stage import Stage
from stages import compute_masks, cut_channels, export_onnx, import_onnx, publish, quantize, validate
from stages.measure.report import ValidationReport
from stages.run.calls import OnReused, RunStage, StageCall, cached_call
from stages.run.checks import Request, check_cut, checked_request
from stages.sparse_train import stage as sparse_train
from stages.sparse_train.stage import drop_checkpoint

STAGES: tuple[Stage, ...] = (import_onnx.STAGE, compute_masks.STAGE, cut_channels.STAGE, sparse_train.STAGE,
                             export_onnx.STAGE, quantize.STAGE, validate.STAGE, publish.STAGE)
BY_NAME = {s.name: s for s in STAGES}


def stage_names(config: CompressConfig) -> tuple[str, ...]:
    """The stages a request runs, in order: a channel structure cuts the graph between masks and training, INT8
    quantization comes between export and validation."""
    skip = {"cut"} if config.structure != "channel" else set()
    skip |= {"quantize"} if config.quantize != "int8" else set()
    return tuple(s.name for s in STAGES if s.name not in skip)


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
    budget: str = "params"  # what target_sparsity counts: weights, weight-layer MACs per image, or priced layer time
    # --target-latency: {"target", "batch", "ratio" (the exported file ÷ the input, median of interleaved rounds)}
    latency_target: dict | None = None
    costs: dict = field(default_factory=dict)  # {"input"|"exported": params, non-zero params, MACs per image}
    forms: list = field(default_factory=list)  # each form measured: role, file, size, gzip, top-1, p50 at batch 1/32
    reused: tuple[str, ...] = ()  # stages whose cached result was reused, in run order
    input_top1: float | None = None  # the input model on the same held-out split, scored before any work
    baseline_accuracy: float | None = None  # what --max-drop was measured from (None: no --max-drop)
    normalization: str = ""  # where the input's mean/std came from (options, a preset, the input's metadata, data)
    geometry: str = ""  # the resize and crop before the model's input, and where they came from
    recipe: str = ""  # the training recipe run (scratch or finetune), and why
    data: dict = field(default_factory=dict)  # pipeline.data.data_record: source, how held, split, unreadable images
    report: ValidationReport | None = field(default=None, repr=False, compare=False)  # in memory only

    @property
    def exit_code(self) -> int:
        return 0 if self.published else 1

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "report"}
        return {**d, "failures": list(self.failures), "reused": list(self.reused), "exit_code": self.exit_code}


class Runner:
    """The stages of one request, each through `run_stage` unless its cached result in `run_dir` is still good."""

    def __init__(self, config: CompressConfig, run_stage: RunStage, run_dir: str,
                 on_reused: OnReused | None = None) -> None:
        self.config, self.run_stage, self.run_dir, self.on_reused = config, run_stage, run_dir, on_reused
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def __call__(self, stage: Stage, **inputs: Any) -> Any:
        """Run `stage` with `inputs`; one that takes `config` gets its view of the config (its declared fields)."""
        if "config" in inputs:
            inputs["config"] = stage.config_for(self.config)
        call = StageCall(stage, inputs, self.run_dir if stage.cached else None)
        t = time.perf_counter()
        result, hit = cached_call(call, self.run_stage)
        self.seconds[stage.name] = round(time.perf_counter() - t, 3)
        if hit:
            self.reused.append(stage.name)
            if self.on_reused is not None:
                self.on_reused(call, result)
        return result


@dataclass(frozen=True)
class Trained:
    """The stages up to training: what export and validation build on."""

    imported: Any
    masks: Any
    graph: str  # the graph that trained: normalized.onnx, or cut.onnx after a channel cut
    train_masks: Any  # the masks it trained under (the cut's all-kept masks after a cut)
    uncut: str | None  # normalized.onnx when the graph was cut
    trained: Any


def train_steps(step: Runner, request: Request, *, masks_stage: Stage = compute_masks.STAGE,
                cut: bool | None = None) -> Trained:
    """import → masks → [cut] → sparse-train, the order every run starts with (a sweep's dense baseline too, with
    its own masks stage). `cut` None: as the config's structure says."""
    config, rd, data = step.config, step.run_dir, request.data
    imported = step(import_onnx.STAGE, model_path=request.model_path, run_dir=rd, config=config)
    normalized = str(imported.normalized_path)
    masks = step(masks_stage, normalized_path=normalized, run_dir=rd, config=config, data=data,
                 output_kind=imported.output_kind)
    if config.cut_check:
        check_cut(masks, config)
    graph, train_masks, uncut = normalized, masks, None
    if config.structure == "channel" if cut is None else cut:  # training, export and validation use the smaller graph
        cut_result = step(cut_channels.STAGE, normalized_path=normalized, masks=masks, run_dir=rd, config=config,
                          data=data)
        graph, train_masks, uncut = str(cut_result.cut_path), cut_result, normalized
    trained = step(sparse_train.STAGE, graph=graph, masks=train_masks, config=config, run_dir=rd, data=data,
                   output_kind=imported.output_kind)
    drop_checkpoint(trained, config.keep_checkpoint)
    return Trained(imported, masks, graph, train_masks, uncut, trained)


def run_all(config: CompressConfig, run_stage: RunStage, *, request: Request | None = None,
            on_reused: OnReused | None = None, publish_result: bool = True) -> RunSummary:
    """Run every stage in order through `run_stage`, except those whose cached result is still good
    (`on_reused(call, result)` hears of each); a gate failure returns a summary with `published` False (nothing is
    published), as does `publish_result=False` (a sweep's cells: the sweep publishes one). Bad input found by a
    stage removes the run directory this call created."""
    request = request or checked_request(config)
    config = request.settle(config)  # its recipe; --max-drop without --baseline-accuracy: from the input's score
    run_dir = Path(request.run_dir)
    created = [p for p in (Path(config.runs_dir), run_dir) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RunFiles.CONFIG, config.model_dump(mode="json"))  # the latest request's
    if request.data.split_file:  # the held-out images this run scores, beside its results
        write_bytes_atomic(run_dir / RunFiles.SPLIT, Path(request.data.split_file).read_bytes())
    rd, data = str(run_dir), request.data
    step = Runner(config, run_stage, rd, on_reused)
    try:
        t = train_steps(step, request)
        exported = step(export_onnx.STAGE, graph=t.graph, trained=t.trained, masks=t.train_masks, config=config,
                        run_dir=rd, data=data, source_sha256=request.source_sha256)
        quantized = step(quantize.STAGE, exported=exported, run_dir=rd, data=data) \
            if config.quantize == "int8" else None
        report = step(validate.STAGE, exported=exported, trained=t.trained, masks=t.masks, config=config, run_dir=rd,
                      data=data, graph=t.graph, uncut=t.uncut, quantized=quantized,
                      input_scores=None if request.input_top1 is None else (request.input_top1, request.input_top5))
        published = step(publish.STAGE, run_dir=rd, report=report, masks_path=str(t.masks.masks_path),
                         config=config) \
            if report.passed and publish_result else None
    except BadInputError:
        for p in reversed(created):  # bad input leaves nothing behind
            shutil.rmtree(p, ignore_errors=True)
        raise
    except ForceCompressError:
        raise
    except Exception as e:  # keep the traceback beside the run's files; a full disk or a denied write: exit 3
        with contextlib.suppress(OSError):  # the disk may be the problem
            write_bytes_atomic(run_dir / RunFiles.ERROR, traceback.format_exc().encode())
        problem = environment_problem(e)
        if problem is not None:
            raise problem from e
        raise

    summary = RunSummary(
        model=config.model, name=config.model_name, run_dir=rd, passed=report.passed,
        published=published is not None, version=published.version if published else None,
        registry_path=published.path if published else None, top1=report.top1, top5=report.top5,
        sparsity=report.sparsity.sparsity, target_sparsity=report.target_sparsity, provider=report.provider,
        sizes=report.sizes, latency_ms=report.latency_ms, failures=report.failures, stage_seconds=step.seconds,
        report_md=report.report_md, effective_density=t.masks.effective_density, structure=config.structure,
        budget=config.budget, costs=report.costs, forms=[_form_summary(f) for f in report.forms],
        latency_target=_latency_target(config, report),
        reused=tuple(step.reused),
        input_top1=request.input_top1, baseline_accuracy=config.baseline_accuracy if config.max_drop is not None
        else None, normalization=data.normalization, report=report,
        geometry=f"{data.geometry.describe()} (from {data.geometry_from})", recipe=request.recipe_reason,
        data=report.data,
    )
    write_json_atomic(run_dir / RunFiles.SUMMARY, summary.to_dict())
    return summary


def _latency_target(config: CompressConfig, report) -> dict | None:
    if config.target_latency is None:
        return None
    fp32 = next(f for f in report.forms if f["role"] == "fp32")
    ratio = fp32["latency_ms"][str(config.latency_batch)]["ratio"]
    return {"target": config.target_latency, "batch": config.latency_batch, "ratio": ratio["median"],
            "p10": ratio["p10"], "p90": ratio["p90"]}


def _form_summary(form: dict) -> dict:
    return {**{k: form[k] for k in ("role", "file", "size", "gzip_size", "top1", "sha256")},
            "onnxruntime_only": form.get("onnxruntime_only", False),
            **{f"p50_ms_batch{b}": t["p50"] for b, t in form["latency_ms"].items()}}
