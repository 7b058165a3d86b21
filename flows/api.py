"""Prefect's API for the CLI: the temporary one started beside the input checks, and the health check of a
configured one. Light on purpose: the CLI enters it before the checks, so that a bad input fails as fast as it can."""

from __future__ import annotations

import contextlib
import threading

import httpx
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

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
        # imported here, in the thread: the import is part of the start-up this overlaps with the checks, and a
        # process that exits on bad input meanwhile leaves no half-started server process behind
        from prefect.server.api.server import SubprocessASGIServer

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
