"""What Prefect prints on the terminal of a CLI run. Prefect logs a failed task or flow with its traceback; for our
own errors (one line that names the problem, see pipeline.errors), a full disk or a denied write, and an interrupted
run, that traceback is noise on the terminal, so the console handler drops it. The run's log in the Prefect API
keeps it (its handler sees the record first), and internal errors keep theirs everywhere."""

from __future__ import annotations

import logging

from pipeline.errors import ForceCompressError, environment_problem


class _NoTracebackForExpectedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        expected = isinstance(exc, ForceCompressError | KeyboardInterrupt) or environment_problem(exc) is not None
        if expected or type(exc).__name__ == "TerminationSignal":
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _NoTracebackForExpectedErrors()


def quiet_expected_tracebacks() -> None:
    """Add the filter to Prefect's console handlers (once; they exist once Prefect has set up its logging)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler) and _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
