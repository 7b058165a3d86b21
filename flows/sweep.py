"""The Prefect 3 flow `force-compress-sweep`: `stages.run.sweep.run_sweep` with every stage of the baseline and the
cells as a task (the same tasks, caching and retries as the flow `force-compress`), the Pareto table and plot as
artifacts. Its parameters are CompressConfig's fields less `sparsity` and `method`, plus `sparsities`, `methods`
and `jobs`."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.compress import log_reused, run_stage_as_task, signature_from_config
from flows.console import quiet_expected_tracebacks
from pipeline.errors import GateFailedError
from stages.run.sweep import (
    DEFAULT_METHODS,
    DEFAULT_SPARSITIES,
    SweepPlan,
    plan_sweep,
    run_sweep,
    table_markdown,
    table_rows,
)

FLOW_NAME = "force-compress-sweep"
DEPLOYMENT_NAME = "force-compress-sweep"

SWEEP_PARAMETERS = {
    "sparsities": (list[float], list(DEFAULT_SPARSITIES), "sparsities to try, each in (0, 1): one cell per method "
                                                          "and sparsity"),
    "methods": (list[str], list(DEFAULT_METHODS), "mask methods to try (as --method)"),
    "jobs": (Annotated[int, Field(ge=1)], 1, "cells run at once (each trains on its own; 1 on a small CPU)"),
}


def _sweep(**params) -> dict:
    logger = get_run_logger()
    sparsities, methods, jobs = params.pop("sparsities"), params.pop("methods"), params.pop("jobs")
    plan = plan_sweep(params, sparsities, methods, jobs)  # one clear BadInputError before any work
    logger.info("sweep of %d cells, files in %s", len(plan.configs), plan.sweep_dir)

    def on_cell(i, cell):
        logger.info("cell %s: top-1 %.4f, sparsity %.4f, gate %s", cell.label, cell.top1, cell.sparsity,
                    "passed" if cell.passed else "FAILED: " + "; ".join(cell.failures))

    result = run_sweep(plan, run_stage_as_task, on_reused=log_reused, on_cell=on_cell)
    create_markdown_artifact(markdown=table_markdown(result, plot_beside=False), key="force-compress-sweep",
                             description=f"sweep of {plan.base.model_name}: the table")
    png = base64.b64encode(Path(result.plot_png).read_bytes()).decode()  # the server holds no files: inline it
    create_image_artifact(image_url=f"data:image/png;base64,{png}", key="force-compress-sweep-plot",
                          description=f"Pareto plot ({result.plot_png})")
    create_table_artifact(table=table_rows(result), key="force-compress-sweep-cells",
                          description="one row per cell: top-1, size, latency, gate, frontier")
    if not result.published:
        raise GateFailedError(f"no cell of the sweep passed its gate, nothing published (table: {result.table_md})",
                              summary=result.to_dict())
    p = result.published
    logger.info("published %s %s (%s) at %s", p["name"], p["version"], result.cells[result.chosen].label, p["path"])
    return result.to_dict()


signature_from_config(_sweep, "force_compress_sweep",
                      "Compress an ONNX classifier at several sparsities (and methods), tabulate and plot top-1 "
                      "against size and latency, and publish the sparsest model that passes its gate.",
                      exclude=("sparsity", "method", "target_latency"), extra=SWEEP_PARAMETERS)

force_compress_sweep = flow(_sweep, name=FLOW_NAME, log_prints=True, persist_result=False, validate_parameters=True)


def run_sweep_flow(plan: SweepPlan, fields: dict) -> dict:
    """The sweep through the flow in this process: its summary, also when no cell passed (exit 1)."""
    params = {k: v for k, v in fields.items() if v is not None}
    quiet_expected_tracebacks()
    try:
        return force_compress_sweep(**params, sparsities=list(plan.sparsities), methods=list(plan.methods),
                                    jobs=plan.jobs)
    except GateFailedError as e:
        if e.summary is None:
            raise
        return e.summary
