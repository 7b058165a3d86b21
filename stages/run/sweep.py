"""A sweep: one compress request per (method, sparsity) cell, a Pareto table and plot, and the sparsest passing
model published. Imports no flows/prefect/click: the CLI and the flow `force-compress-sweep` pass how to run a
stage, as they do to `run_all`, and the sweep runs the stages in `run_all`'s order (its baseline: `train_steps`).

Order: the dense baseline is trained first with the cells' training budget (its held-out top-1 is the baseline
`--max-drop` is measured from, unless `--baseline-accuracy` is given); then each cell runs `run_all` without
publishing (its stages cached in its own run directory, so a repeated or interrupted sweep reuses and resumes
them), at most `jobs` at a time; then the table and plot; then the sparsest cell that passed its gate is published.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.artifacts import RunFiles, atomic_path, run_dir_for, sha256_json, write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig, make_config
from pipeline.errors import BadInputError, RunStoppedError
from pipeline.plotting import drawn_alone
from pipeline.stage import Stage
from stages import compute_masks, import_onnx, publish
from stages.run.calls import OnReused, RunStage, StageCall
from stages.run.checks import Request, checked_request, run_fingerprint
from stages.run.order import Runner, run_all, train_steps
from stages.sparse_train import stage as sparse_train

DEFAULT_SPARSITIES = (0.9, 0.95, 0.98, 0.99)
DEFAULT_METHODS = ("force",)


def parse_sparsities(text: str | list | tuple) -> tuple[float, ...]:
    """'0.9,0.95' (or a list) → sorted distinct sparsities, each in (0, 1); BadInputError (exit 2) otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s for s in (s.strip() if isinstance(s, str) else s for s in items) if s != ""]
    if not items:
        raise BadInputError("--sparsities is empty: give a comma-separated list such as 0.9,0.95,0.98,0.99")
    values = []
    for s in items:
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise BadInputError(f"--sparsities: {s!r} is not a number (e.g. 0.9,0.95,0.98)") from None
        if not 0.0 < v < 1.0 or math.isnan(v):
            raise BadInputError(f"--sparsities: {v:g} is out of range; each sparsity is the pruned fraction, "
                                "in (0, 1) exclusive")
        values.append(v)
    return tuple(sorted(set(values)))


def parse_methods(text: str | list | tuple) -> tuple[str, ...]:
    """'force,iter_snip' (or a list) → distinct method names in the given order (checked later, per structure)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not names:
        raise BadInputError("--methods is empty: give a comma-separated list such as force,iter_snip")
    return tuple(names)


def cell_label(method: str, sparsity: float) -> str:
    return f"{method}@{sparsity:g}"


@dataclass(frozen=True)
class SweepPlan:
    """What the checks before any work found: every cell's config and request, and where the sweep's files go."""

    base: CompressConfig  # the shared options (its sparsity and method are the first cell's)
    sparsities: tuple[float, ...]
    methods: tuple[str, ...]
    configs: tuple[CompressConfig, ...]
    requests: tuple[Request, ...]
    sweep_dir: str
    jobs: int

    def label(self, i: int) -> str:
        return cell_label(self.configs[i].method, self.configs[i].sparsity)


def plan_sweep(fields: dict, sparsities, methods, jobs: int = 1) -> SweepPlan:
    """Every cell's config, checked (bad input → BadInputError before any file is written)."""
    sparsities, methods = parse_sparsities(sparsities), parse_methods(methods)
    if jobs < 1:
        raise BadInputError(f"--jobs must be at least 1, got {jobs}")
    given = {k: v for k, v in fields.items() if k not in ("sparsity", "method")}
    configs = tuple(make_config(**given, method=m, sparsity=s) for m in methods for s in sparsities)
    first = checked_request(configs[0])  # model, data, registry, devices: the same for every cell, checked once
    requests = tuple(replace(first, run_dir=str(run_dir_for(c.runs_dir, first.source_sha256,
                                                            run_fingerprint(first.settle(c))))) for c in configs)
    key = sha256_json({"cells": [r.run_dir for r in requests], "baseline": configs[0].baseline_accuracy,
                       "max_drop": configs[0].max_drop})
    sweep_dir = Path(configs[0].runs_dir) / f"sweep-{first.source_sha256[:12]}-{key[:12]}"
    return SweepPlan(configs[0], sparsities, methods, configs, requests, str(sweep_dir), jobs)


# --- the dense baseline ------------------------------------------------------------------------------------


def dense_masks(normalized_path: str, run_dir: str, config, data,
                output_kind: str = "logits") -> compute_masks.MaskResult:
    """Every weight kept: the dense network trained by the sparse-train stage is the baseline (no loss is scored)."""
    return compute_masks.compute_masks_stage(normalized_path, Path(run_dir) / RunFiles.MASKS, method="random",
                                             density=1.0)


DENSE_MASKS = Stage("masks", dense_masks, reads=frozenset(), outputs=(RunFiles.MASKS,))
BASELINE_STAGES = (import_onnx.STAGE, sparse_train.STAGE)


def baseline_run_dir(config: CompressConfig, request: Request) -> Path:
    """Keyed on the model and the fields of import and training: every sweep with the same recipe shares it."""
    config = config.with_recipe(request.recipe, request.attention)
    return run_dir_for(config.runs_dir, request.source_sha256, {"dense": run_fingerprint(config, BASELINE_STAGES)})


def train_baseline(config: CompressConfig, request: Request, run_stage: RunStage,
                   on_reused: OnReused | None = None) -> dict:
    """Train the dense network with `config`'s training recipe (the cells' budget) in its own cached run directory;
    its held-out top-1 (torch, the split validation scores) is the baseline."""
    run_dir = baseline_run_dir(config, request)
    config = config.with_recipe(request.recipe, request.attention)
    run_dir.mkdir(parents=True, exist_ok=True)
    step = Runner(config.model_copy(update={"cut_check": False}), run_stage, str(run_dir), on_reused)
    trained = train_steps(step, request, masks_stage=DENSE_MASKS, cut=False).trained
    return {"top1": trained.val_acc, "run_dir": str(run_dir), "epochs": trained.epochs,
            "source": "dense training, same recipe"}


# --- cells, the frontier, the choice ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell's outcome, as the table and plot show it."""

    method: str
    target_sparsity: float
    sparsity: float  # read from the exported file
    top1: float
    drop: float | None  # baseline top-1 − top-1
    passed: bool
    failures: tuple[str, ...]
    size: int | None  # the primary (dense FP32) file, bytes; None: stopped before training (no file)
    smallest_file: str | None  # the smallest published form
    smallest_size: int | None
    p50_ms_batch1: float | None
    p50_ms_batch32: float | None
    macs: int | None
    run_dir: str
    reused: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return cell_label(self.method, self.target_sparsity)


def _cell(summary: dict, baseline: float | None) -> Cell:
    forms = [f for f in summary["forms"] if f["role"] != "input"]
    primary = next(f for f in forms if f["role"] == "fp32")
    smallest = min(forms, key=lambda f: f["size"])
    macs = (summary.get("costs") or {}).get("exported", {}).get("macs")
    return Cell(method=summary["method"], target_sparsity=summary["target_sparsity"],
                sparsity=summary["sparsity"], top1=summary["top1"],
                drop=None if baseline is None else round(baseline - summary["top1"], 6), passed=summary["passed"],
                failures=tuple(summary["failures"]), size=primary["size"], smallest_file=smallest["file"],
                smallest_size=smallest["size"], p50_ms_batch1=primary["p50_ms_batch1"],
                p50_ms_batch32=primary["p50_ms_batch32"], macs=macs, run_dir=summary["run_dir"],
                reused=tuple(summary.get("reused", ())))


def _stopped_cell(config: CompressConfig, run_dir: str, error: RunStoppedError) -> Cell:
    """A cell stopped before validation (masks that cut the network, a diverged training): a failed cell (the
    others go on)."""
    return Cell(method=config.method, target_sparsity=config.sparsity, sparsity=config.sparsity, top1=0.0, drop=None,
                passed=False, failures=(str(error).split(";")[0],), size=None, smallest_file=None,
                smallest_size=None, p50_ms_batch1=None, p50_ms_batch32=None, macs=None, run_dir=run_dir)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: x (cost) no larger and y (top-1) no smaller, one strictly;
    ordered by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def choose(cells: list[Cell]) -> int | None:
    """The sparsest cell that passed its gate: the highest target sparsity (each method meets it; measured values
    differ in the fourth digit), then the higher top-1, then the higher measured sparsity."""
    passing = [i for i, c in enumerate(cells) if c.passed]
    return max(passing, key=lambda i: (cells[i].target_sparsity, cells[i].top1, cells[i].sparsity)) \
        if passing else None


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: str
    model: str
    name: str
    baseline: dict | None
    threshold: float  # the top-1 a cell needed (min accuracy, or baseline − max drop when higher)
    cells: tuple[Cell, ...]
    chosen: int | None
    published: dict | None  # name, version, path, created
    table_md: str
    plot_png: str
    summary_json: str
    seconds: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.published else 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cells"] = [{**asdict(c), "label": c.label} for c in self.cells]
        d["chosen_label"] = self.cells[self.chosen].label if self.chosen is not None else None
        d["exit_code"] = self.exit_code
        return d


def run_sweep(plan: SweepPlan, run_stage: RunStage, *, on_reused: OnReused | None = None,
              on_cell: Callable[[int, Cell], None] | None = None) -> SweepResult:
    """Baseline, cells (at most plan.jobs at a time), table and plot, then publish the sparsest passing cell."""
    t0 = time.perf_counter()
    base = plan.base
    if base.baseline_accuracy is not None:
        baseline = {"top1": base.baseline_accuracy, "source": "--baseline-accuracy"}
    else:
        baseline = train_baseline(base, plan.requests[0], run_stage, on_reused)
    seconds = {"baseline": round(time.perf_counter() - t0, 2)}
    configs = [c.model_copy(update={"baseline_accuracy": baseline["top1"]}) for c in plan.configs]

    reports: dict[int, object] = {}  # each measured cell's ValidationReport, for the publish of the chosen one

    def one(i: int) -> Cell:
        try:
            summary = run_all(configs[i], run_stage, request=plan.requests[i], on_reused=on_reused,
                              publish_result=False)
            reports[i] = summary.report
            cell = _cell({**summary.to_dict(), "method": configs[i].method}, baseline["top1"])
        except RunStoppedError as e:
            cell = _stopped_cell(configs[i], plan.requests[i].run_dir, e)
        if on_cell is not None:
            on_cell(i, cell)
        return cell

    t1 = time.perf_counter()
    if plan.jobs == 1:
        cells = [one(i) for i in range(len(configs))]
    else:  # threads: the stages release the GIL in torch and onnxruntime; each keeps the caller's context (Prefect's)
        with ThreadPoolExecutor(max_workers=plan.jobs, thread_name_prefix="cell") as pool:
            futures = [pool.submit(contextvars.copy_context().run, one, i) for i in range(len(configs))]
            cells = [f.result() for f in futures]
    seconds["cells"] = round(time.perf_counter() - t1, 2)

    threshold = base.min_accuracy
    if base.max_drop is not None:
        threshold = max(threshold, baseline["top1"] - base.max_drop)
    chosen = choose(cells)
    sweep_dir = Path(plan.sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    result = SweepResult(sweep_dir=str(sweep_dir), model=base.model, name=base.model_name, baseline=baseline,
                         threshold=threshold, cells=tuple(cells), chosen=chosen, published=None,
                         table_md=str(sweep_dir / "sweep.md"), plot_png=str(sweep_dir / "pareto.png"),
                         summary_json=str(sweep_dir / "sweep.json"), seconds=seconds)
    write_pareto_plot(result, result.plot_png)
    published = None
    if chosen is not None:
        cell, config = cells[chosen], configs[chosen]
        p = run_stage(StageCall(publish.STAGE, {"run_dir": cell.run_dir, "report": reports[chosen], "config": config,
                                                "masks_path": str(Path(cell.run_dir) / RunFiles.MASKS)}))
        published = {"name": p.name, "version": p.version, "path": p.path, "created": p.created}
    seconds["total"] = round(time.perf_counter() - t0, 2)
    result = replace(result, published=published, seconds=seconds)
    write_bytes_atomic(result.table_md, table_markdown(result).encode())
    write_json_atomic(result.summary_json, result.to_dict())
    return result


# --- the table and the plot ---------------------------------------------------------------------------------


def table_rows(result: SweepResult) -> list[dict]:
    """One row per cell, in the order of the table (Prefect's table artifact takes these)."""
    measured = [i for i, c in enumerate(result.cells) if c.size is not None]
    front_size = {measured[j] for j in pareto_front([(result.cells[i].smallest_size, result.cells[i].top1)
                                                     for i in measured])}
    front_lat = {measured[j] for j in pareto_front([(result.cells[i].p50_ms_batch32, result.cells[i].top1)
                                                    for i in measured])}
    rows = []
    for i, c in enumerate(result.cells):
        rows.append({
            "cell": c.label + (" (published)" if i == result.chosen and result.published else ""),
            "sparsity": f"{c.sparsity:.4f}", "top-1": f"{c.top1:.4f}",
            "drop": "" if c.drop is None else f"{c.drop:+.4f}",
            "gate": "pass" if c.passed else "FAIL: " + c.failures[0] + (
                f" (+{len(c.failures) - 1} more)" if len(c.failures) > 1 else ""),
            "smallest file": "" if c.size is None else f"{c.smallest_file} {c.smallest_size / 1e6:.3f} MB",
            "p50 b1 (ms)": "" if c.size is None else f"{c.p50_ms_batch1:.3f}",
            "p50 b32 (ms)": "" if c.size is None else f"{c.p50_ms_batch32:.2f}",
            "MACs": "" if c.macs is None else f"{c.macs / 1e6:.4g}M",
            "frontier": ", ".join(k for k, s in (("size", front_size), ("latency", front_lat)) if i in s),
        })
    return rows


def table_markdown(result: SweepResult, plot_beside: bool = True) -> str:
    """sweep.md; `plot_beside` False (a Prefect artifact, which holds no files) names the plot's path instead."""
    rows = table_rows(result)
    head = list(rows[0]) if rows else []
    b = result.baseline
    lines = [f"# Sweep of {Path(result.model).name}", ""]
    if b:
        lines.append(f"Dense baseline top-1 {b['top1']:.4f} ({b['source']}); a cell passes with top-1 ≥ "
                     f"{result.threshold:.4f} and its other checks.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    if result.published:
        p = result.published
        lines += ["", f"Published {result.cells[result.chosen].label}: {p['name']} {p['version']} ({p['path']}"
                      f"{'' if p['created'] else ', same content as before'})."]
    else:
        lines += ["", "No cell passed its gate: nothing published."]
    lines += ["", "Latency: onnxruntime on the CPU, p50 of the primary file, each cell timed in its own run (cells "
                  "measured at different times: compare ratios within a cell's report, not across a few percent).",
              "", f"![Pareto plot]({Path(result.plot_png).name})" if plot_beside else f"Pareto plot: {result.plot_png}",
              ""]
    return "\n".join(lines)


@drawn_alone
def write_pareto_plot(result: SweepResult, path: str | Path) -> None:
    """Top-1 against the smallest file and against p50 latency at batch 32, one point per cell, frontier drawn."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    cells = [c for c in result.cells if c.size is not None]  # a cut cell has no file to place
    chosen = cells.index(result.cells[result.chosen]) if result.chosen is not None else None
    for ax, xs, xlabel, log in (
        (axes[0], [c.smallest_size / 1e6 for c in cells], "smallest published file (MB)", True),
        (axes[1], [c.p50_ms_batch32 for c in cells], "p50 latency at batch 32 (ms, onnxruntime CPU)", False),
    ):
        ys = [c.top1 for c in cells]
        for k, method in enumerate(dict.fromkeys(c.method for c in cells)):
            for passed, marker in ((True, "o"), (False, "x")):
                idx = [i for i, c in enumerate(cells) if c.method == method and c.passed == passed]
                if idx:
                    ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], marker=marker, color=f"C{k}",
                               label=f"{method} ({'pass' if passed else 'fail'})")
        for i, c in enumerate(cells):
            ax.annotate(f"{c.target_sparsity:g}", (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="gray", linestyle="--",
                label="frontier")
        if result.baseline:
            ax.axhline(result.baseline["top1"], color="tab:green", linewidth=0.8, label="dense baseline")
        ax.axhline(result.threshold, color="tab:red", linewidth=0.8, linestyle=":", label="gate")
        if chosen is not None:
            ax.scatter([xs[chosen]], [ys[chosen]], s=160, facecolors="none", edgecolors="black",
                       label="published")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (held-out)")
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep of {Path(result.model).name}: one point per cell (labels: target sparsity)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
