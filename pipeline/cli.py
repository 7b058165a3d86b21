"""The `force-compress` command line: the one module on top of everything (it may import stages and flows).

Exit codes: 0 success/published, 1 gate failed, 2 bad input, 3 environment, other = internal error.
"""

from __future__ import annotations

import functools
import sys

import click

from pipeline.errors import ForceCompressError


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


if __name__ == "__main__":
    main()
