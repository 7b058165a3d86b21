"""The `force-compress` command line: the one module on top of everything (it may import stages and flows).

Exit codes: 0 success/published, 1 gate failed, 2 bad input, 3 environment, 4 internal error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import time
import traceback
import types

import click

# Prefect's server sends telemetry at start-up; offline (CI jobs, air-gapped machines) that prints a "database is
# locked" traceback and ERROR lines into normal output. Off unless the user turns it on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline.errors import ForceCompressError, Interrupted, environment_problem


def _handle_errors(fn):
    """Every outcome of a command gets its exit code: our exceptions one line on stderr and no traceback; SIGTERM and
    SIGINT 128 + the signal after the `finally` blocks on the way have cleaned up; an OSError that is the machine's
    (disk full, permission denied, name too long) exit 3 with one line; anything else exit 4 with its traceback.
    With `--json`, stdout also gets one JSON object whatever the outcome (`_fail`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = kwargs.get("as_json", False)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            _fail(as_json, e, 128 + signum, "interrupted",
                  f"interrupted by {signal.Signals(signum).name}: no staging folder or half-written file is left; "
                  "run the same command again to resume from the stages that finished")
        except ForceCompressError as e:
            _fail(as_json, e, e.exit_code, error_kind(e), str(e))
        except Exception as e:  # noqa: BLE001 - the last word on every outcome
            problem = environment_problem(e)
            if problem is not None:
                _fail(as_json, e, problem.exit_code, error_kind(problem), str(problem))
            traceback.print_exc()
            _fail(as_json, e, 4, "internal", f"internal error: {type(e).__name__}: {e}")
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def error_kind(e: ForceCompressError) -> str:
    """The `error` of the JSON answer: the exception's class in snake case, less "_error" (gate_failed,
    training_diverged, network_cut, bad_input, invalid_model, unsupported_operator, data, environment_problem, ...)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower().removesuffix("_error")


def _fail(as_json: bool, e: BaseException, code: int, kind: str, message: str) -> None:
    """One line on stderr (the message), with --json one object on stdout, then exit `code`."""
    line = message if kind in ("internal", "interrupted") else f"error: {message}"
    run_dir = getattr(e, "run_dir", None)
    click.echo(line + (f" (run directory {run_dir})" if run_dir and kind == "internal" else ""), err=True)
    if as_json:
        click.echo(json.dumps({"exit_code": code, "error": kind, "message": message, "run_dir": run_dir}))
    sys.exit(code)


def _note_run_dir(e: BaseException, run_dir: str) -> None:
    """Tell `_handle_errors` which run directory a failure belongs to."""
    with contextlib.suppress(AttributeError):
        if getattr(e, "run_dir", None) is None:
            e.run_dir = run_dir


def _config_default(name: str):
    from pipeline.config import CompressConfig

    return CompressConfig.model_fields[name].default


class _Commands(click.Group):
    """click's own usage errors (an unknown option, a value of the wrong type: exit 2) answer `--json` too."""

    def main(self, args=None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:  # Ctrl-C while click itself reads input
            click.echo("interrupted by SIGINT", err=True)
            sys.exit(130)
        except click.ClickException as e:
            e.show()
            if "--json" in args:
                click.echo(json.dumps({"exit_code": e.exit_code, "error": "usage", "message": e.format_message(),
                                       "run_dir": None}))
            sys.exit(e.exit_code)


@click.group(cls=_Commands)
@click.version_option(package_name="force-compress")
def main() -> None:
    """Prune ONNX classifiers at initialization (FORCE), sparse-train, validate and publish them."""


# --- commands: masks, apply-masks, inspect, export-model (ONNX in/out) ---


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@main.command("masks")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--method", required=True, help="mask method (force, iter_snip, snip, grasp, synflow, magnitude, random)")
@click.option("--sparsity", required=True, type=float, help="fraction of prunable weights to remove, e.g. 0.9")
@click.option("--steps", type=int, default=None, help="pruning steps for iterative methods [default: the method's]")
@click.option("--schedule", type=click.Choice(["exp", "linear"]), default="exp", show_default=True)
@click.option("--data", default=None, help="data spec for data-dependent methods: digits | imagefolder:PATH | npz:PATH")
@click.option("--batch-size", type=int, default=128, show_default=True, help="images per pruning mini-batch")
@click.option("--batches-per-step", type=int, default=1, show_default=True)
@click.option("--image-size", type=int, nargs=2, default=None, metavar="H W", help="for dynamic spatial inputs")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train-norm/--no-train-norm", default=True, show_default=True,
              help="BatchNorm-fused layers get a BatchNorm (batch statistics) while masks are computed")
@click.option("--min-per-layer", type=int, default=_config_default("min_per_layer"), show_default=True,
              help="weights every prunable layer keeps at least (0: none, as the paper)")
@click.option("--structure", type=click.Choice(["unstructured", "channel"]), default="unstructured", show_default=True,
              help="single weights, or whole channels (masks.json then lists the kept channels of each group)")
@click.option("--channel-multiple", type=int, default=_config_default("channel_multiple"), show_default=True,
              help="channel structure: channels kept in blocks of this many per group [default: the block the "
                   "runtime computes channels in: onnxruntime CPU 16 with AVX-512, 8 with AVX2; CUDA 8]")
@click.option("--budget", type=click.Choice(["params", "macs", "latency"]), default=None,
              help="what --sparsity removes: weights, MACs per image, or the layers' time measured on onnxruntime "
                   "[default: macs for channels, else params]")
@click.option("--latency-batch", type=int, default=_config_default("latency_batch"), show_default=True,
              help="--budget latency: the batch the layers are timed at")
@click.option("--weight-sparsity", type=float, default=None,
              help="--budget macs or latency: also remove at least this fraction of the prunable weights")
@click.option("--channel-ranking", type=click.Choice(["global", "per-group"]),
              default=_config_default("channel_ranking"), show_default=True,
              help="channels ranked by their saliency, or by their saliency over their group's mean (for models at "
                   "initialization: README, --channel-ranking)")
@click.option("--out", "out", default="masks.npz", show_default=True, type=click.Path(dir_okay=False))
@_handle_errors
def masks_cmd(model, method, sparsity, steps, schedule, data, batch_size, batches_per_step, image_size, seed,
              train_norm, min_per_layer, structure, channel_multiple, budget, latency_batch, weight_sparsity,
              channel_ranking, out):
    """Compute pruning masks for an ONNX MODEL; masks.npz is keyed by ONNX initializer name."""
    from stages.run.tools import masks_for

    result = masks_for(model, out, method=method, sparsity=sparsity, data=data, steps=steps, schedule=schedule,
                       batch_size=batch_size, batches_per_step=batches_per_step,
                       image_size=tuple(image_size) if image_size else None, seed=seed, train_norm=train_norm,
                       min_per_layer=min_per_layer, structure=structure, channel_multiple=channel_multiple,
                       budget=budget, latency_batch=latency_batch, weight_sparsity=weight_sparsity,
                       channel_ranking=channel_ranking)
    click.echo(f"{result.masks_path}: {method}, kept {result.kept}/{result.total} "
               f"(sparsity {1 - result.density:.4f}), {len(result.disconnected)} disconnected layers; "
               f"sidecar {result.meta_path}")


@main.command("apply-masks")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("masks", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--storage", type=click.Choice(["dense", "sparse"]), default="dense", show_default=True)
@click.option("--image-size", type=int, nargs=2, default=None, metavar="H W", help="for dynamic spatial inputs")
@_handle_errors
def apply_masks_cmd(model, masks, out, storage, image_size):
    """Zero the masked weights of MODEL (no training) and write OUT.onnx."""
    from stages.run.tools import apply_masks

    result = apply_masks(model, masks, out, storage=storage, image_size=tuple(image_size) if image_size else None)
    click.echo(f"{result.out_path}: sparsity {1 - result.density:.4f} of {result.n_prunable} prunable weights; "
               f"{result.size_bytes} bytes ({storage}); dense {result.dense_size_bytes} "
               f"(gzip {result.dense_gzip_bytes}), sparse {result.sparse_size_bytes} (gzip {result.sparse_gzip_bytes})")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--no-import", "no_import", is_flag=True, help="skip the trial import (faster)")
@click.option("--image-size", type=int, nargs=2, default=None, metavar="H W", help="for dynamic spatial inputs")
@_handle_errors
def inspect_cmd(model, as_json, no_import, image_size):
    """Per-layer shapes, parameter counts and sparsity, opset, producer, and whether import succeeds."""
    from stages.run.tools import inspect_model

    info = inspect_model(model, try_import=not no_import, image_size=tuple(image_size) if image_size else None)
    if as_json:
        _echo_json(info)
        return
    click.echo(f"{info['path']}: producer {info['producer'] or '?'}, IR {info['ir_version']}, opsets {info['opsets']}")
    for v in info["inputs"]:
        click.echo(f"  input  {v['name']} {v['shape']}")
    for v in info["outputs"]:
        click.echo(f"  output {v['name']} {v['shape']}")
    click.echo(f"  {info['nodes']} nodes, {info['params_total']} parameters, {info['prunable_params']} prunable, "
               f"sparsity {info['sparsity']:.4f}")
    for layer in info["layers"]:
        click.echo(f"  {layer['op']:<13} {layer['initializer']:<48} {str(layer['shape']):<22} "
                   f"{layer['params']:>10} {layer['sparsity']:7.2%}")
    if "import" in info:
        imp = info["import"]
        click.echo("  import: ok" + (f" ({'; '.join(imp['changes'])})" if imp["changes"] else "")
                   if imp["ok"] else f"  import: FAILS: {imp['error']}")
    if "effective" in info:
        eff, cut = info["effective"], info["effective"]["cut_layers"]
        names = ", ".join(cut[:5]) + (f" and {len(cut) - 5} more" if len(cut) > 5 else "")
        where = f"; no path through {len(cut)} layer(s): {names}" if cut else ""
        click.echo(f"  effective density {eff['effective_density']:.4f} ({eff['effective_kept_total']} non-zero "
                   f"weights on an input→output path){where}")


@main.command("export-model")
@click.argument("arch")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--num-classes", type=int, default=10, show_default=True)
@click.option("--input-size", type=int, nargs=2, default=(32, 32), show_default=True, metavar="H W")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 18]")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torchscript (dynamo=False) keeps BatchNorm nodes; dynamo folds them in eval mode")
@click.option("--seed", type=int, default=0, show_default=True)
@_handle_errors
def export_model_cmd(arch, out, num_classes, input_size, opset, exporter, seed):
    """Export torchvision architecture ARCH at initialization (no download) to ONNX."""
    from stages.onnx_convert.torchvision_export import DEFAULT_OPSET, export_torchvision

    path = export_torchvision(arch, out, num_classes=num_classes, input_size=tuple(input_size),
                              opset=opset or DEFAULT_OPSET, exporter=exporter, seed=seed)
    click.echo(f"{path}: torchvision {arch} at init, {num_classes} classes, input 3x{input_size[0]}x{input_size[1]}, "
               f"opset {opset or DEFAULT_OPSET}, exporter {exporter}")


# --- commands: compress, serve (the flow) ---


def _config_option(name: str, field):
    """A click option for one CompressConfig field: type, choices and help come from the field. Every
    default is None so that an option not given falls back to CompressConfig's default (one source)."""
    from typing import Literal, Union, get_args, get_origin

    flag = "--" + name.replace("_", "-")
    ann = field.annotation
    if get_origin(ann) in (Union, types.UnionType):
        ann = next(a for a in get_args(ann) if a is not type(None))
    default = "" if field.is_required() else f" [default: {field.default}]"
    help_ = f"{field.description}{default}"
    if ann is bool:
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_)
    if get_origin(ann) is Literal:
        return click.option(flag, name, type=click.Choice([str(a) for a in get_args(ann)]), default=None, help=help_)
    if get_origin(ann) is tuple:
        args = get_args(ann)
        return click.option(flag, name, type=args[0], nargs=len(args), default=None, help=help_,
                            metavar=" ".join(["N"] * len(args)))
    if get_origin(ann) is list:
        return click.option(flag, name, type=_NumberList(), default=None, help=help_, metavar="X,Y,...")
    return click.option(flag, name, type=ann, default=None, help=help_)


class _NumberList(click.ParamType):
    """A comma-separated list of numbers (`--mean 0.485,0.456,0.406`)."""

    name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 0.485,0.456,0.406)", param, ctx)


def _config_options(fn, exclude=("model",)):
    from pipeline.config import CompressConfig

    for name, field in reversed(list(CompressConfig.model_fields.items())):
        if name not in exclude:
            fn = _config_option(name, field)(fn)
    return fn


def _stage_printer(names: tuple[str, ...], labels: dict | None = None):
    """(`run_stage`, `on_reused`) for the plain path: call the stage, then one line about it on stderr; a stage
    whose cached result is reused gets one line saying so. `labels` (run directory → label) prefixes each line with
    the sweep cell it belongs to."""
    from stages.run.calls import call_stage, describe

    total = len(names)

    def where(call) -> str:
        label = (labels or {}).get(call.run_dir)
        return (f"{label} " if label else "") + f"[{names.index(call.name) + 1 if call.name in names else 0}/{total}]"

    def run_stage(call):
        click.echo(f"{where(call)} {call.name} ...", err=True)
        t = time.perf_counter()
        result = call_stage(call)
        seconds = time.perf_counter() - t
        click.echo(f"{where(call)} {call.name:<12} {seconds:6.1f}s  {describe(result)}", err=True)
        return result

    def on_reused(call, result) -> None:
        click.echo(f"{where(call)} {call.name}: reused (cached)  {describe(result)}", err=True)

    return run_stage, on_reused


def _prefect_api(wanted: bool):
    """Prefect's temporary API started while the block checks the input (flows.api.prefect_api_starting)."""
    if not wanted:
        return contextlib.nullcontext()
    from flows.api import prefect_api_starting

    return prefect_api_starting()


def _outcome(summary: dict) -> dict:
    """The keys every JSON answer has (see `_fail`) for a run that got to its gate."""
    run_dir = summary.get("run_dir") or summary.get("sweep_dir")  # a sweep's answer: its sweep directory
    if summary["exit_code"] == 0:
        version = summary.get("version") or (summary.get("published") or {}).get("version")
        return {"error": None, "message": f"published {summary['name']} {version}", "run_dir": run_dir}
    failures = summary.get("failures") or ["no cell passed its gate"]
    return {"error": "gate_failed", "message": "validation gate failed, nothing published: " + "; ".join(failures),
            "run_dir": run_dir}


def _print_summary(summary: dict) -> None:
    z, lat = summary["sizes"], summary["latency_ms"]
    if summary["published"]:
        click.echo(f"published {summary['name']} {summary['version']} -> {summary['registry_path']}")
    else:
        click.echo("validation gate FAILED, nothing published:")
        for f in summary["failures"]:
            click.echo(f"  - {f}")
    target = summary.get("latency_target")
    if target:
        click.echo(f"  latency ÷ input at batch {target['batch']}: {target['ratio']:.3f} (p10–p90 {target['p10']:.3f}–"
                   f"{target['p90']:.3f}; target {target['target']:g}), found at sparsity "
                   f"{summary['target_sparsity']:.4f}")
    if summary.get("budget") == "macs":
        before, after = (summary["costs"].get(k, {}).get("weight_macs") or 0 for k in ("input", "exported"))
        removed = f"MACs removed {1 - after / max(before, 1):.4f} (target {summary['target_sparsity']:g}), " \
                  f"weights removed {summary['sparsity']:.4f}"
    elif summary.get("budget") == "latency":
        removed = f"priced layer time removed: target {summary['target_sparsity']:.4g}, weights removed " \
                  f"{summary['sparsity']:.4f}"
    else:
        removed = f"sparsity {summary['sparsity']:.4f} (target {summary['target_sparsity']:g})"
    click.echo(f"  top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  {removed}  onnxruntime on "
               f"{summary['provider']}")
    if summary.get("input_top1") is not None:
        baseline = summary.get("baseline_accuracy")
        drop = f"; --max-drop measured from {baseline:.4f}" if baseline is not None else ""
        click.echo(f"  input model: top-1 {summary['input_top1']:.4f} on the same images, mean/std from "
                   f"{summary['normalization']}{drop}")
        click.echo(f"  {summary['recipe']}")
    bad = (summary.get("data") or {}).get("unreadable") or {}
    if bad.get("unreadable"):
        names = ", ".join(b["image"] for b in bad["first"])
        click.echo(f"  skipped {bad['unreadable']} unreadable image(s) of {bad['images']}: {names}")
    sizes = ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in z.items())
    click.echo(f"  sizes: {sizes}")
    ratio = lat.get("ratio", {})
    verdict = f"; exported ÷ input {ratio['median']:.2f} ({ratio['verdict']})" if ratio else ""
    click.echo(f"  latency p50: input {lat['input']['p50']:.3f} ms, exported {lat['exported']['p50']:.3f} ms{verdict}")
    costs = summary.get("costs") or {}
    if costs:
        before, after = costs["input"], costs["exported"]
        click.echo(f"  parameters {before['params']:,} → {after['params']:,} ({after['nonzero_params']:,} non-zero), "
                   f"MACs per image {before['macs'] / 1e6:,.1f}M → {after['macs'] / 1e6:,.1f}M")
    for f in summary.get("forms", []):  # the input first: its accuracy beside the outputs'
        click.echo(f"  {f['role']:<8} {f['file']:<26} {f['size'] / 1e6:8.3f} MB (gzip {f['gzip_size'] / 1e6:.3f})  "
                   f"top-1 {f['top1']:.4f}  p50 {f['p50_ms_batch1']:.3f} ms at batch 1, "
                   f"{f['p50_ms_batch32']:.2f} ms at 32" + ("  (onnxruntime only)" if f.get("onnxruntime_only")
                                                             else ""))
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in summary.get("stage_seconds", {}).items())
    click.echo(f"  stages: {stages}; total {summary.get('seconds', 0):.1f}s")
    click.echo(f"  report: {summary['report_md']}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_config_options
@click.option("--json", "as_json", is_flag=True, help="print one machine-readable summary on stdout")
@click.option("--no-prefect", is_flag=True, help="run the stages as plain calls, without the Prefect flow")
@_handle_errors
def compress(model: str, as_json: bool, no_prefect: bool, **fields) -> None:
    """Prune MODEL at initialization, sparse-train, export, validate and publish it.

    \b
    Exit codes (with --json, stdout always holds one object: exit_code, error, message, run_dir):
      0    published
      1    validation gate failed, the masks cut the network, or training diverged (nothing published)
      2    bad input (model, data, options), checked before any work where it can be
      3    environment: CUDA asked for but absent, no Prefect API, a disk full or too small, a path not
           writable or a name too long (checked before any work; met later: traceback in error.txt)
      4    internal error (traceback on stderr and in the run directory's error.txt)
      130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: no staging folder or half-written file left"""

    from pipeline.config import make_config
    from stages.run.checks import check_request, hand_over
    from stages.run.order import run_all, stage_names

    start = time.perf_counter()
    config = make_config(model=model, **fields)  # a bad option stops here, before Prefect is touched
    with _prefect_api(not no_prefect):
        request = check_request(config)  # bad input stops here, before any file is written
    for line in request.describe_input(config):
        click.echo(line, err=True)
    # With --json, stdout carries the summary only: whatever a stage prints goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with quiet:
            if no_prefect:
                run_stage, on_reused = _stage_printer(stage_names(config))
                summary = run_all(config, run_stage, request=request, on_reused=on_reused).to_dict()
            else:
                from flows.compress import run_flow

                hand_over(config, request)  # the flow takes the checked request and its data, not checking again
                summary = run_flow(config)
    except BaseException as e:  # exit codes: _handle_errors (an internal error is 4, never 1: "gate failed")
        _note_run_dir(e, request.run_dir)
        raise
    summary = {**summary, **_outcome(summary), "prefect": not no_prefect,
               "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        click.echo(json.dumps(summary, default=str))  # keys in order: stages run order
    else:
        _print_summary(summary)
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--sparsities", default="0.9,0.95,0.98,0.99", show_default=True,
              help="comma-separated sparsities, each in (0, 1): one cell per method and sparsity")
@click.option("--methods", default="force", show_default=True, help="comma-separated mask methods (as --method)")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="cells run at once (each trains on its own; 1 on a small CPU)")
@functools.partial(_config_options, exclude=("model", "sparsity", "method", "target_latency"))
@click.option("--json", "as_json", is_flag=True, help="print one machine-readable summary on stdout")
@click.option("--no-prefect", is_flag=True, help="run the stages as plain calls, without the Prefect flow")
@_handle_errors
def sweep(model: str, sparsities: str, methods: str, jobs: int, as_json: bool, no_prefect: bool, **fields) -> None:
    """Compress MODEL at several sparsities (and methods), tabulate and plot top-1 against size and latency, and
    publish the sparsest model that passes its gate.

    \b
    The dense network is trained first with the same budget: its top-1 is the baseline of --max-drop (unless
    --baseline-accuracy is given). Each cell is a compress run without publishing, cached in its own run
    directory; the table (sweep.md, sweep.json) and the plot (pareto.png) go to RUNS_DIR/sweep-*/.

    \b
    Exit codes:
      0  the sparsest passing cell is published
      1  no cell passed its gate (the table says why), or the masks cut the network
      2  bad input (model, data, options, an empty or out-of-range --sparsities), checked before any work
      3  environment (CUDA asked for but absent, no Prefect API, registry unreachable, a disk full or
         too small, a path not writable or a name too long)
      4  internal error (traceback in the cell's run directory's error.txt)
      130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM"""

    from stages.run.checks import hand_over
    from stages.run.order import stage_names
    from stages.run.sweep import baseline_run_dir, parse_methods, parse_sparsities, plan_sweep, run_sweep

    start = time.perf_counter()
    sparsities, methods = parse_sparsities(sparsities), parse_methods(methods)  # before Prefect is touched
    with _prefect_api(not no_prefect):
        plan = plan_sweep({"model": model, **fields}, sparsities, methods, jobs)  # bad input stops here
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with quiet:
        if no_prefect:
            labels = {r.run_dir: plan.label(i) for i, r in enumerate(plan.requests)}
            labels[str(baseline_run_dir(plan.base, plan.requests[0]))] = "dense"
            run_stage, on_reused = _stage_printer(stage_names(plan.base), labels)
            summary = run_sweep(plan, run_stage, on_reused=on_reused).to_dict()
        else:
            from flows.sweep import run_sweep_flow

            hand_over(plan.configs[0], plan.requests[0])
            summary = run_sweep_flow(plan, {"model": model, **fields})
    summary = {**summary, **_outcome(summary), "prefect": not no_prefect,
               "seconds_wall": round(time.perf_counter() - start, 2)}
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        _print_sweep(summary)
    sys.exit(summary["exit_code"])


def _print_sweep(summary: dict) -> None:
    from pathlib import Path

    click.echo(Path(summary["table_md"]).read_text().split("\n![")[0].rstrip())
    click.echo(f"  table: {summary['table_md']}\n  plot:  {summary['plot_png']}\n  json:  {summary['summary_json']}")
    click.echo(f"  seconds: {summary['seconds']}")


@main.command()
@_handle_errors
def serve() -> None:
    """Serve the Prefect deployments force-compress/force-compress and force-compress-sweep/force-compress-sweep
    (needs PREFECT_API_URL; see the README).

    \b
    Then: prefect deployment run force-compress/force-compress --param model=/abs/model.onnx --param sparsity=0.9
     or:  prefect deployment run force-compress-sweep/force-compress-sweep --param model=/abs/model.onnx"""
    # before Prefect is imported: its settings are read once, at import
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")  # pick runs up within ~2 s (default 10)
    from flows.serving import serve_deployments

    serve_deployments()


# --- commands: predict (a published model on its own) ---


@main.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top", "top", type=click.IntRange(min=1), default=5, show_default=True, help="labels per image")
@click.option("--json", "as_json", is_flag=True, help="one JSON list on stdout: image, top labels and probabilities")
@_handle_errors
def predict_cmd(model, images, top, as_json):
    """Classify IMAGE files (PNG, JPEG, … or .npy) with MODEL: a registry version directory or an .onnx file that
    records its preprocessing; prints each image's top labels with softmax probabilities, on onnxruntime's CPU."""

    from pipeline.predict import predict, resolve_model
    from stages.publish.manifest import MODEL_FILE

    predictions = predict(resolve_model(model, MODEL_FILE), images, top=top)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in predictions]))
        return
    for p in predictions:
        click.echo(f"{p.image}: " + ", ".join(f"{label} {prob:.4f}" for label, _, prob in p.top))


if __name__ == "__main__":
    main()
