"""The one exception hierarchy of force-compress; each class carries its CLI exit code.

Exit codes: 0 success, 1 validation gate failed (nothing published), 2 usage or bad input,
3 environment problem; anything else is an internal error.
"""

from __future__ import annotations


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
    """The training loss stopped being a finite number: stopped before the epoch's checkpoint."""


class BadInputError(ForceCompressError):
    """Unreadable or invalid input: model file, data, arguments."""

    exit_code = 2


class InvalidModelError(BadInputError):
    """The ONNX file is missing, truncated, corrupt or fails the checker."""


class UnsupportedOperatorError(BadInputError):
    """An operator (domain, type, version) that cannot be converted to PyTorch."""


class DataError(BadInputError):
    """Data that is missing, unreadable or does not fit the model."""


class ParityError(BadInputError):
    """The converted PyTorch module disagrees with onnxruntime beyond the tolerance."""


class EnvironmentProblem(ForceCompressError):
    """The machine cannot do what was asked (CUDA requested but absent, unwritable directory)."""

    exit_code = 3
