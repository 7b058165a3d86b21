"""The Prefect 3 flow `force-compress`: the stages of `stages.run.order.run_all` as tasks, plus what Prefect adds
(retries, artifacts, logs). No logic a stage could hold lives here.

Caching is run_all's, the same as on the plain path: a stage whose record in run_dir/.stages/ has the same key
(`stages.run.calls.stage_key`: code version, input files' hashes, the fields the stage declares) and whose files
exist is not run again, and the log says "<stage>: reused (cached)". Prefect's own task cache is off: a second
cache keyed the same way would only disagree with the first about files rewritten in between.

The flow's parameters are CompressConfig's fields, generated from the model (names, types, constraints,
defaults and descriptions), so the deployment's parameter schema cannot drift from the config.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flows.console import quiet_expected_tracebacks
from pipeline.config import CompressConfig, make_config
from pipeline.errors import GateFailedError, RunStoppedError
from stages.measure.report import layer_table
from stages.run.calls import StageCall, describe
from stages.run.checks import checked_request
from stages.run.order import run_all

FLOW_NAME = "force-compress"
DEPLOYMENT_NAME = "force-compress"


# --- tasks ------------------------------------------------------------------------------------------------


def _transient_io(task, task_run, state) -> bool:
    """Retry publish on OSError (full disk, NFS hiccup, lock contention), never on a refused gate."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    return isinstance(exc, OSError)


_TASKS: dict[Any, Any] = {}


def _task_for(call: StageCall):
    """One Prefect task per stage function, built once. Results are small records (paths and figures); run_all
    decides whether a stage runs at all (its cache), so the task itself never caches."""
    key = (call.fn, call.name)
    if key not in _TASKS:
        retry = {"retries": 3, "retry_delay_seconds": 1, "retry_condition_fn": _transient_io} \
            if call.name == "publish" else {}
        _TASKS[key] = task(call.fn, name=call.name, cache_policy=NO_CACHE, persist_result=False, **retry)
    return _TASKS[key]


def run_stage_as_task(call: StageCall):
    """`run_stage` for run_all: the stage as a Prefect task."""
    logger = get_run_logger()
    logger.info("stage %s: started", call.name)
    t = time.perf_counter()
    result = _task_for(call)(**call.kwargs)
    logger.info("stage %s: %.1fs  %s", call.name, time.perf_counter() - t, describe(result))
    return result


def log_reused(call: StageCall, result) -> None:
    """`on_reused` for run_all: one log line for a stage whose cached result is reused."""
    get_run_logger().info("stage %s: reused (cached)  %s", call.name, describe(result))


# --- the flow ---------------------------------------------------------------------------------------------


def _compress(**params) -> dict:
    logger = get_run_logger()
    config = make_config(**params)  # one clear BadInputError before any work
    request = checked_request(config)  # the CLI's checks, when it started this flow; else made here
    logger.info("run directory %s", request.run_dir)
    for line in request.describe_input(config):
        logger.info(line)
    try:
        summary = run_all(config, run_stage_as_task, request=request, on_reused=log_reused)
    except RunStoppedError as e:  # cut network, diverged training: a failed run with one line, not a traceback
        return Failed(message=str(e), data=e)  # the caller still gets the exception (exit 1)
    report = summary.report
    create_markdown_artifact(markdown=Path(report.report_md).read_text(), key="force-compress-report",
                             description=f"validation report of {config.model_name}")
    create_table_artifact(table=layer_table(report), key="force-compress-layers",
                          description="per-layer density read from the exported file")
    if not summary.published:
        raise GateFailedError("validation gate failed, nothing published: " + "; ".join(summary.failures),
                              summary=summary.to_dict())
    logger.info("published %s %s at %s", summary.name, summary.version, summary.registry_path)
    return summary.to_dict()


def signature_from_config(fn, name: str, summary: str, *, exclude=(), extra: dict | None = None) -> None:
    """Give `fn` CompressConfig's fields (less `exclude`; `extra` maps a name to (annotation, default, description),
    placed after `model`) as keyword parameters with their types, constraints and defaults, and an Args docstring
    from their descriptions: Prefect's parameter schema, which then cannot drift from the config. `name` is the
    module attribute the flow is bound to (Prefect loads a served flow back by `<module>:<name>`)."""
    fields = [(n, f) for n, f in CompressConfig.model_fields.items() if n not in exclude]
    params, doc = [], [summary, "", "Args:"]

    def add(n, annotation, default, description):
        params.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
        doc.append(f"    {n}: {description}")

    for n, f in fields:
        annotation = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        add(n, annotation, inspect.Parameter.empty if f.is_required() else f.default, f.description)
        if n == "model":
            for e, (annotation, default, description) in (extra or {}).items():
                add(e, annotation, default, description)
    fn.__signature__ = inspect.Signature(params, return_annotation=dict)
    fn.__doc__ = "\n".join(doc)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    fn.__name__ = fn.__qualname__ = name


signature_from_config(_compress, "force_compress",
                      "Prune an ONNX classifier at initialization, sparse-train, validate and publish it.")

force_compress = flow(_compress, name=FLOW_NAME, log_prints=True, persist_result=False, validate_parameters=True)


def run_flow(config: CompressConfig) -> dict:
    """The pipeline through the flow in this process (the temporary API unless PREFECT_API_URL is set): its summary,
    also when the gate failed (exit 1)."""
    quiet_expected_tracebacks()
    try:
        return force_compress(**config.given())  # the recipe fills in what was not given, in the flow as here
    except GateFailedError as e:
        if e.summary is None:  # stopped before training: no summary to show
            raise
        return e.summary
