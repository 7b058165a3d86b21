"""One lock for every figure the stages draw: a sweep runs cells in threads of one process, and matplotlib's text
layout (mathtext's parser, font caches) is shared state that two threads drawing at once corrupt."""

from __future__ import annotations

import functools
import threading

_LOCK = threading.RLock()


def drawn_alone(fn):
    """Run the decorated plotting function under the process-wide figure lock."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LOCK:
            return fn(*args, **kwargs)

    return wrapper
