"""Publish targets, keyed by scheme like the data sources: `mlflow:URI` goes to an MLflow Model Registry, anything
else is a registry directory. Each target has a check (run before any work: a registry we cannot use stops the
request at once) and a publish."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    prefix: str  # "mlflow:"; "" for the registry directory, which takes whatever no prefix claims
    # (location, model name, bytes needed) -> None; BadInputError (exit 2) / EnvironmentProblem (exit 3)
    check: Callable[[str, str, int], None]
    publish: Callable  # (location, name, VersionContent, report, config) -> PublishResult


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target; a second target for the same prefix is refused."""
    if target.prefix in _TARGETS:
        raise ValueError(f"publish target {target.name!r}: prefix {target.prefix!r} is taken by "
                         f"{_TARGETS[target.prefix].name!r}")
    _TARGETS[target.prefix] = target
    return target


def resolve(registry: str) -> tuple[Target, str]:
    """(target, location) of a `--registry` value: the target whose prefix it starts with, and the rest."""
    registry = str(registry)
    for prefix, target in _TARGETS.items():
        if prefix and registry.startswith(prefix):
            return target, registry[len(prefix):]
    return _TARGETS[""], registry
