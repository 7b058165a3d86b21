"""The one exception hierarchy of force-compress; each class carries its CLI exit code.

Exit codes: 0 success, 1 validation gate failed (nothing published), 2 usage or bad input,
3 environment problem; anything else is an internal error.
"""

from __future__ import annotations

import errno


class ForceCompressError(Exception):
    """Base class: a problem the user can act on. The message is one line saying what and what to do."""

    exit_code = 4


class GateFailedError(ForceCompressError):
    """The validation gate refused the model; nothing was published. `summary`: the run's summary (what `--json`
    prints), when the run got as far as validation."""

    exit_code = 1

    def __init__(self, message: str = "", summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class RunStoppedError(GateFailedError):
    """The run stopped before validation because what it made cannot pass: nothing published, the run's files stay
    in its directory for inspection."""


class NetworkCutError(RunStoppedError):
    """The masks leave (nearly) no kept weight on an input→output path: stopped before training."""


class TrainingDivergedError(RunStoppedError):
    """The training or validation loss stopped being a finite number: stopped before the epoch's checkpoint."""


class BadInputError(ForceCompressError):
    """Unreadable or invalid input: model file, data, arguments."""

    exit_code = 2


class InvalidModelError(BadInputError):
    """The ONNX file is missing, truncated, corrupt or fails the checker."""


class UnsupportedOperatorError(BadInputError):
    """An operator (domain, type, version) that cannot be converted to PyTorch."""


class ModelShapeError(BadInputError):
    """A model input force-compress cannot feed: channels-last (NHWC), or a dynamic channel axis."""


class DataError(BadInputError):
    """Data that is missing, unreadable or does not fit the model."""


class ParityError(BadInputError):
    """The converted PyTorch module disagrees with onnxruntime beyond the tolerance."""


class EnvironmentProblem(ForceCompressError):
    """The machine cannot do what was asked (CUDA requested but absent, unwritable directory)."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGTERM (CI cancellation, Kubernetes) or SIGINT (Ctrl-C) stopped the run. A KeyboardInterrupt, so that no
    `except Exception` on the way swallows it while every `finally` still cleans up; exit 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# errno values that say the machine, not the input or our code, stopped a write: exit 3
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "a file name is longer than the file system allows",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files on the system",
    errno.EIO: "an input/output error on the device",
}


def environment_problem(e: BaseException) -> EnvironmentProblem | None:
    """The EnvironmentProblem an OSError stands for (disk full, permission denied, name too long, ...), or None
    for any other exception."""
    if not isinstance(e, OSError) or e.errno not in _ENVIRONMENT_ERRNOS:
        return None
    where = next((f for f in (e.filename2, e.filename) if f is not None), "a file")  # a copy: filename2 is the target
    fix = {errno.ENOSPC: "free space there or point --runs-dir/--registry at a larger disk",
           errno.EDQUOT: "free space there or point --runs-dir/--registry elsewhere",
           errno.ENAMETOOLONG: "use a shorter --registry, --runs-dir or --model-name"}.get(
        e.errno, "make it writable or point --runs-dir/--registry elsewhere")
    return EnvironmentProblem(f"{_ENVIRONMENT_ERRNOS[e.errno]} writing {where}; {fix}")
