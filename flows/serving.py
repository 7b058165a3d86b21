"""Prefect's API for the CLI: the temporary one started beside the input checks, the health check of a configured
one, and serving the deployments `force-compress/force-compress` and `force-compress-sweep/force-compress-sweep`."""

from __future__ import annotations

import contextlib
import threading

import httpx
from prefect import serve
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
from prefect.types.entrypoint import EntrypointType

from flows.compress import DEPLOYMENT_NAME as COMPRESS_DEPLOYMENT
from flows.compress import force_compress
from flows.sweep import DEPLOYMENT_NAME as SWEEP_DEPLOYMENT
from flows.sweep import force_compress_sweep
from pipeline.errors import EnvironmentProblem


@contextlib.contextmanager
def prefect_api_starting():
    """Start Prefect's temporary API (no PREFECT_API_URL set) in a thread while the block checks the input, and wait
    for it at the block's end: its ~4 s start-up overlaps the checks instead of following them, and the flow finds
    the same server (Prefect keeps one per process). Bad input in the block kills it at once, so the error is not
    held up by its shutdown. With an API configured, nothing happens."""
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    servers = []

    def start():
        servers.append(SubprocessASGIServer())
        with contextlib.suppress(Exception):  # the flow starts it again and reports what goes wrong
            servers[0].start()

    thread = threading.Thread(target=start, name="prefect-api", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        if servers and servers[0].server_process is not None:
            servers[0].server_process.kill()
        raise
    thread.join()


def check_prefect_api(url: str) -> None:
    """EnvironmentProblem (exit 3) unless the Prefect API at `url` answers its health check."""
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as e:
        raise EnvironmentProblem(
            f"no Prefect API answers at {url} ({type(e).__name__}: {' '.join(str(e).split())[:120]}): start one with "
            "`prefect server start --host 127.0.0.1` or fix PREFECT_API_URL") from None


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
