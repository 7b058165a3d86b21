"""The `force-compress` command line: the one module on top of everything (it may import stages and flows).

Exit codes: 0 success/published, 1 gate failed, 2 bad input, 3 environment, other = internal error.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import types

import click

from pipeline.errors import EnvironmentProblem, ForceCompressError, GateFailedError


def _handle_errors(fn):
    """Map our exceptions to their exit codes with one line on stderr, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ForceCompressError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


@click.group()
@click.version_option(package_name="force-compress")
def main() -> None:
    """Prune ONNX classifiers at initialization (FORCE), sparse-train, validate and publish them."""


# --- commands: masks, apply-masks, inspect, export-model (ONNX in/out) ---

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
    return click.option(flag, name, type=ann, default=None, help=help_)


def _config_options(fn):
    from pipeline.config import CompressConfig

    for name, field in reversed(list(CompressConfig.model_fields.items())):
        if name != "model":
            fn = _config_option(name, field)(fn)
    return fn


def _stage_printer(total: int):
    """`run_stage` for the plain path: call the stage, then one line about it on stderr."""
    from stages.run_all import STAGE_NAMES, call_stage, describe

    def run_stage(stage):
        index = STAGE_NAMES.index(stage.name) + 1 if stage.name in STAGE_NAMES else 0
        click.echo(f"[{index}/{total}] {stage.name} ...", err=True)
        t = time.perf_counter()
        result = call_stage(stage)
        seconds = time.perf_counter() - t
        click.echo(f"[{index}/{total}] {stage.name:<12} {seconds:6.1f}s  {describe(stage.name, result)}", err=True)
        return result

    return run_stage


def _print_summary(summary: dict) -> None:
    z, lat = summary["sizes"], summary["latency_ms"]
    if summary["published"]:
        click.echo(f"published {summary['name']} {summary['version']} -> {summary['registry_path']}")
    else:
        click.echo("validation gate FAILED, nothing published:")
        for f in summary["failures"]:
            click.echo(f"  - {f}")
    click.echo(f"  top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  sparsity {summary['sparsity']:.4f}"
               f" (target {summary['target_sparsity']:g})  onnxruntime on {summary['provider']}")
    sizes = ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in z.items())
    click.echo(f"  sizes: {sizes}")
    click.echo(f"  latency p50: input {lat['input']['p50']:.3f} ms, exported {lat['exported']['p50']:.3f} ms"
               " (onnxruntime runs unstructured zeros at dense speed)")
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in summary.get("stage_seconds", {}).items())
    click.echo(f"  stages: {stages}; total {summary.get('seconds', 0):.1f}s")
    click.echo(f"  report: {summary['report_md']}")


def _run_flow(config, run_dir: str) -> dict:
    """The pipeline through the Prefect flow (ephemeral API unless PREFECT_API_URL is set)."""
    import json
    from pathlib import Path

    from flows.compress import force_compress

    try:
        return force_compress(**config.model_dump())
    except GateFailedError:
        path = Path(run_dir) / "summary.json"
        if path.exists():
            return json.loads(path.read_text())
        raise


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_config_options
@click.option("--json", "as_json", is_flag=True, help="print one machine-readable summary on stdout")
@click.option("--no-prefect", is_flag=True, help="run the stages as plain calls, without the Prefect flow")
@_handle_errors
def compress(model: str, as_json: bool, no_prefect: bool, **fields) -> None:
    """Prune MODEL at initialization, sparse-train, export, validate and publish it.

    Exit codes: 0 published, 1 validation gate failed (nothing published), 2 bad input, 3 environment."""
    import json
    import traceback

    from pipeline.config import make_config
    from stages.run_all import STAGE_NAMES, check_request, run_all

    start = time.perf_counter()
    config = make_config(model=model, **fields)
    request = check_request(config)  # bad input stops here, before any file is written
    try:
        if no_prefect:
            summary = run_all(config, _stage_printer(len(STAGE_NAMES)), request=request).to_dict()
        else:
            summary = _run_flow(config, request.run_dir)
    except ForceCompressError:
        raise
    except Exception as e:  # internal error: keep the traceback, exit 4 (never 1, which means "gate failed")
        traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e} (run directory {request.run_dir})", err=True)
        sys.exit(4)
    summary = {**summary, "prefect": not no_prefect, "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
    else:
        _print_summary(summary)
    sys.exit(summary["exit_code"])


@main.command()
@_handle_errors
def serve() -> None:
    """Serve the Prefect deployment force-compress/force-compress (needs PREFECT_API_URL; see docs/prefect.md).

    Then: prefect deployment run force-compress/force-compress --param model=/abs/model.onnx --param sparsity=0.9"""
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")  # pick runs up within ~2 s (default 10)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise EnvironmentProblem(
            "no Prefect API to serve to: run `prefect server start --host 127.0.0.1` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)"
        )
    from flows.compress import serve as serve_deployment

    serve_deployment()


if __name__ == "__main__":
    main()
