"""Serving the deployments `force-compress/force-compress` and `force-compress-sweep/force-compress-sweep`."""

from __future__ import annotations

import httpx
from prefect import serve
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType

from flows.api import check_prefect_api
from flows.compress import DEPLOYMENT_NAME as COMPRESS_DEPLOYMENT
from flows.compress import force_compress
from flows.sweep import DEPLOYMENT_NAME as SWEEP_DEPLOYMENT
from flows.sweep import force_compress_sweep
from pipeline.errors import EnvironmentProblem


def serve_deployments() -> None:
    """Serve both deployments until interrupted. It needs a Prefect API (PREFECT_API_URL, e.g. a local `prefect
    server start`; README, "Running it with Prefect"). The entrypoints are module paths, so the deployments run
    wherever this package is installed."""
    url = PREFECT_API_URL.value()
    if not url:
        raise EnvironmentProblem(
            "no Prefect API to serve to: run `prefect server start --host 127.0.0.1` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)"
        )
    check_prefect_api(str(url))
    module = EntrypointType.MODULE_PATH
    try:
        serve(force_compress.to_deployment(name=COMPRESS_DEPLOYMENT, entrypoint_type=module),
              force_compress_sweep.to_deployment(name=SWEEP_DEPLOYMENT, entrypoint_type=module),
              pause_on_shutdown=False)
    except (httpx.ConnectError, httpx.TimeoutException) as e:  # the server went away while serving
        raise EnvironmentProblem(f"lost the Prefect API at {url}: {e}") from None
